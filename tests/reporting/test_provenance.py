"""Train-time provenance (mgrpo_cli/reporting/provenance.py): commit, dirty flag, package versions."""
import json
import subprocess

from mgrpo_cli.reporting import provenance


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_capture_reads_the_checkout_commit_and_whether_it_is_dirty(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    clean = provenance.capture(repo)
    assert clean["commit"] == head and len(head) == 40 and clean["dirty"] is False
    assert "torch" in clean["packages"] and clean["python"].count(".") == 2
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.capture(repo)["dirty"] is True
    # a folder inside a checkout is not that checkout (an installed package inside some repository)
    (repo / "site").mkdir()
    assert provenance.capture(repo / "site")["commit"] is None
    assert provenance.capture(tmp_path)["commit"] is None  # no checkout at all


def test_record_keeps_the_first_leg_and_appends_resumed_legs(tmp_path):
    first = provenance.record(tmp_path)
    again = provenance.record(tmp_path)
    assert provenance.read(tmp_path) == again == json.loads((tmp_path / "provenance.json").read_text())
    assert again["commit"] == first["commit"] and len(again["resumes"]) == 1
    assert again["resumes"][0]["packages"] == first["packages"]
    assert provenance.read(tmp_path / "missing") is None

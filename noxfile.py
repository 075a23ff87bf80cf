"""Test sessions: `nox` runs `tests` (the default, fast) ; `nox -s lint`, `nox -s slow`, `nox -s bench`.

Sessions reuse the current environment (`python=False`): install once as the README says, then run.
"""
import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "none"


@nox.session(python=False)
def tests(session):
    """The fast suite (slow end-to-end checks excluded)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session(python=False)
def slow(session):
    """Minutes-long checks: the default training run's held-out gains."""
    session.run("python", "-m", "pytest", "-q", "-m", "slow", *session.posargs)


@nox.session(python=False)
def lint(session):
    session.run("ruff", "check", "mgrpo_cli", "tests", "benchmarks", "noxfile.py")


@nox.session(python=False)
def bench(session):
    """Speed benchmarks (not tests): grading throughput and training-step speed against TRL."""
    session.run("python", "benchmarks/grading_speed.py")
    session.run("python", "benchmarks/step_speed.py", *session.posargs)

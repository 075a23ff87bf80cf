"""Test sessions: `nox` runs `lint` and `tests` (the default, fast); `nox -s slow`, `nox -s bench`.

Sessions reuse the current environment (`python=False`): install once as the README says, then run.
"""
import nox
import nox.virtualenv

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"
# Every session runs in the current environment, so no virtualenv backend is needed: telling nox
# that the optional ones (uv among them) are absent keeps it from probing for them at each session.
nox.virtualenv.OPTIONAL_VENVS = dict.fromkeys(("conda", "mamba", "micromamba", "rattler", "uv"), False)


@nox.session(python=False)
def tests(session):
    """The fast suite (slow end-to-end checks excluded)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session(python=False)
def slow(session):
    """Minutes-long checks: the default training run's held-out gains, resume, sweeps."""
    session.run("python", "-m", "pytest", "-q", "-m", "slow", *session.posargs)


@nox.session(python=False)
def lint(session):
    """ruff over the package, the tests, the benchmarks and the scripts."""
    session.run("ruff", "check", "mgrpo_cli", "tests", "benchmarks", "scripts", "noxfile.py")


@nox.session(python=False)
def bench(session):
    """Speed benchmarks (not tests): grading throughput (numbers; a mix, its slowest case) and training-step speed against TRL."""
    session.run("python", "benchmarks/grading_speed.py")
    session.run("python", "benchmarks/grading_mix.py")
    session.run("python", "benchmarks/step_speed.py", *session.posargs)

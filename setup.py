"""The one build step ``pyproject.toml`` cannot state: ``conf/`` into the package.

``conf/`` stays at the top of the repository and is copied into the built package as
``mgrpo_cli/conf``, where an installed ``mgrpo`` finds it (``config.schema.conf_dir``). An editable
install reads ``conf/`` in place, so nothing is copied for it. ``MANIFEST.in`` puts ``conf/`` into the
source distribution, so a wheel built from that gets it too.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            shutil.copytree(HERE / "conf", Path(self.build_lib, "mgrpo_cli", "conf"), dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})

"""Everything is in pyproject.toml except one file: ``bdh_mlx_blas.pth``, which must sit in site-packages itself
(see ``bdh_mlx_blas_hook.py``). ``build_py`` puts it beside the package, for wheels and editable installs alike."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "bdh_mlx_blas.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # An editable install's wheel is assembled in install_lib; a normal wheel is build_lib as it stands.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, str(Path(target) / PTH))


setup(cmdclass={"build_py": BuildPyWithPth})

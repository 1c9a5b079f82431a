"""Build the Cython core: every pyx/blockpull/*.pyx becomes blockpull.<name>."""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    exts = []
    for pyx in sorted(glob.glob(os.path.join("pyx", "blockpull", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                "blockpull." + name,
                [pyx],
                define_macros=[("_GNU_SOURCE", "1"), ("_FILE_OFFSET_BITS", "64")],
                extra_compile_args=["-O2"],
            )
        )
    return exts


setup(
    ext_modules=cythonize(
        extensions(),
        include_path=["pyx"],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)

"""Builds the optional C extension ``guestnet.wire._native`` (metadata lives in pyproject.toml).

The extension holds the per-frame leaf operations (guestnet/wire/native.py says which). It is
optional: without a compiler or Python headers the build skips it with a warning and guestnet
runs the pure-Python implementation of the same functions (guestnet/wire/pure.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "guestnet.wire._native",
            sources=["src/guestnet/wire/_native.c"],
            extra_compile_args=["-Wall", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)

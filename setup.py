"""Build of mpicomm's optional compiled core (the metadata is in setup.cfg).

``mpicomm.shm._core`` (docs/shm.md) is optional: where it does not compile, the package installs
without it and the collectives use MPI alone (``python -m mpicomm info`` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mpicomm.shm._core",
            # one module from three files (docs/shm.md, "Building"): the binding, the segment
            # protocol, the sums; the headers ship in the sdist as depends
            sources=["mpicomm/shm/_core.c", "mpicomm/shm/segment.c", "mpicomm/shm/sums.c"],
            depends=["mpicomm/shm/segment.h", "mpicomm/shm/sums.h"],
            # no -march: the sums pick AVX-512 / AVX2 / baseline at run time (target_clones);
            # no contraction into FMAs, which would round differently from torch
            # hidden: the files' shared functions bind inside the module (libc has a `step`)
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-ffp-contract=off",
                "-fno-strict-aliasing",
                "-fvisibility=hidden",
            ],
            libraries=["rt"],
            optional=True,
        ),
    ]
)

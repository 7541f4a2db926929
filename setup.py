"""Packaging for dispynode, the stdlib port of the dispy 4.5 compute node."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r"^__version__ = '([^']+)'", (HERE / 'dispynode.py').read_text(),
                    re.M).group(1)

setup(
    name='dispynode',
    version=VERSION,
    description='Compute node for dispy 4.5 clients on modern Python, standard library only',
    long_description=(HERE / 'README.rst').read_text(),
    long_description_content_type='text/x-rst',
    license='MIT',
    py_modules=['dispynode', 'dispy_common'],
    python_requires='>=3.8',
    # psutil finds a cancelled job's whole process tree; the node also works
    # without it (a copy of the two files: /proc or ps(1) instead).
    install_requires=['psutil'],
    entry_points={'console_scripts': ['dispynode = dispynode:main']},
    classifiers=[
        'License :: OSI Approved :: MIT License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: Python :: 3 :: Only',
        'Topic :: System :: Distributed Computing',
    ],
)

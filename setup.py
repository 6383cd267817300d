"""Packaging for pushservice: the package plus its twistd plugin dropin."""

import re

from setuptools import setup

# the version is written once, in the package
with open("pushservice/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)  # type: ignore[union-attr]

setup(
    name="pushservice",
    version=VERSION,
    description="Real-time push over WebSocket, fed by a Redis list (a twistd plugin)",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    # find_packages() misses the twisted.plugins namespace; never ship its __init__.py
    packages=["pushservice", "twisted.plugins"],
    package_data={"pushservice": ["static/*", "*.lua"], "twisted.plugins": []},
    # upper bounds on the libraries whose internals pushservice/_internals.py uses:
    # an upgrade is checked with tests/test_internals.py first (README, "Upgrading the libraries")
    install_requires=[
        "twisted[tls]>=24.7,<27",
        "autobahn[twisted]>=26.7.1,<27",  # 26.7.1: bounded inflating of client frames (zip bombs)
        "txredisapi>=1.6,<1.7",
        "hiredis>=3,<4",  # txredisapi's C reply parser: its own reads an XREAD of 1000 entries in 1000s of reactor turns
        "PyJWT>=2.8",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "redis>=5",
            "hypothesis>=6",
            "selenium>=4.20",
            "websockets>=13",  # a second client implementation (permessage-deflate)
            "ruff>=0.6",
            "mypy>=1.10",
            "mypy-zope>=1.0",
        ],
    },
    entry_points={"console_scripts": ["pushservice-mktap = pushservice.mktap:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP",
    ],
)

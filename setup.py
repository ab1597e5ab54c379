from setuptools import find_packages, setup

from proxsmtp import __version__

setup(
    name="proxsmtpd",
    version=__version__,
    description="Transparent filtering SMTP proxy (a Python port of proxsmtp)",
    license="BSD-3-Clause",
    packages=find_packages(include=["proxsmtp", "proxsmtp.*"]),
    python_requires=">=3.11",
    install_requires=[
        "python-daemon>=2.3",
        "setproctitle>=1.3",
        "python-prctl>=1.8",
        "configobj>=5.0.8",
        "uvloop>=0.17",
        "prometheus-client>=0.16",
    ],
    extras_require={"test": ["pytest>=7", "aiosmtpd>=1.4", "hypothesis>=6", "trustme>=0.9",
                             "pytest-xdist>=3"]},
    entry_points={"console_scripts": ["proxsmtpd = proxsmtp.cli:main"]},
)

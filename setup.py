from setuptools import find_packages, setup

setup(
    name="llava_agile",
    version="0.1.0",
    packages=find_packages(include=["llava_agile", "llava_agile.*"]),
    python_requires=">=3.10",
)

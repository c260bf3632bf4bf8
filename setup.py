"""Builds the cffi KVM binding at install time; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["cffi_kvm/build.py:ffibuilder"])

"""Isolation runtimes behind one interface (see `appliance.runtime.base`)."""

"""Helpers shared by the tests: namespaces on the real servers, waiting, the running services, synthetic data.

Test modules import from here, never from one another.
"""

"""The ``configserver`` command line: argument parsing (``main``) and output (``format``).

Only this package reads argv, the environment and configuration files, and only it exits.
"""

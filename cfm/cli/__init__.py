"""The command line: absl flag definitions and their translation into configs (cfm/config/).

The top layer, imported only by the entry scripts and bench/; no library module imports it, and
importing a library module defines no flag (tests/test_layout.py, tests/test_config.py).
"""

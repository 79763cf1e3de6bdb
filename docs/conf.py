"""Sphinx configuration for mpicomm."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "mpicomm"
author = "the mpicomm developers"
copyright = "2026, the mpicomm developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["myst.xref_missing"]

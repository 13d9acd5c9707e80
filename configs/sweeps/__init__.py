"""Sweep configs (mode `sweep`): variants of other configs, run in turn, then tabled and plotted."""

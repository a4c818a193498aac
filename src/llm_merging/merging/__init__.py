"""Merge methods: ``Merges`` here; a submission's own method modules are found in its files."""

"""The LLM merging competition starter kit's ``llm_merging`` package, as the arena runs it.

Starter-kit method files (``llm_merging/merging/<Method>.py``, classes extending ``Merges``) run
unmodified on top of this package: ``from llm_merging.merging.Merges import Merges`` gets the
class in this package, which loads models through mergearena's model references (a local path,
``zoo:NAME`` or a hub id already in the local cache; never a download) and only those the
competition allows. ``llm_merging.submission`` puts a submission's own files behind this package
and reads which method it registers.
"""

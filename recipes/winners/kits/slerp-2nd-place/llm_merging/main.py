from llm_merging.merging import SimpleLlamaMerge


def all_merge_handlers():
    """The methods of this submission, by the name --merging_method takes."""
    return {"simple_llama_merge": SimpleLlamaMerge}

from llm_merging.merging import DareTiesFewShot


def all_merge_handlers():
    """The methods of this submission, by the name --merging_method takes."""
    return {"dare_ties_fewshot": DareTiesFewShot}

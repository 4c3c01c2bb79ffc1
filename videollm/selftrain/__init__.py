"""Self-training: preference-data builders and answer verifiers (used by data_tools/make_preferences.py)."""

from videollm.selftrain.preferences import (
    PERTURBATIONS,
    BuildReport,
    PairFilter,
    Prompt,
    curriculum_stages,
    differing_phrases,
    exclusive_class_verifiers,
    model_answerer,
    perturb_video,
    prompts_from_labelled,
    temporal_pairs,
    verified_pairs,
    write_curriculum,
)
from videollm.selftrain.verifiers import ClassVerifier, get_verifier

__all__ = [
    "PERTURBATIONS",
    "BuildReport",
    "ClassVerifier",
    "PairFilter",
    "Prompt",
    "curriculum_stages",
    "differing_phrases",
    "exclusive_class_verifiers",
    "get_verifier",
    "model_answerer",
    "perturb_video",
    "prompts_from_labelled",
    "temporal_pairs",
    "verified_pairs",
    "write_curriculum",
]

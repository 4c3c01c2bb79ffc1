"""Self-training: answer verifiers, preference-data builders, Video-STaR cycles and self-preference rounds.

The loops live in `videollm.selftrain.star` (`run_star`, recipes/star.py) and `videollm.selftrain.self_preference`
(`run_self_preference`, recipes/self_preference.py); they import the trainers, so they are not imported here.
"""

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
from videollm.selftrain.verifiers import (
    ClassVerifier,
    RecordVerifiers,
    Verdict,
    Verifier,
    build_verifier,
    get_verifier,
)

__all__ = [
    "PERTURBATIONS",
    "BuildReport",
    "ClassVerifier",
    "RecordVerifiers",
    "Verdict",
    "Verifier",
    "build_verifier",
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

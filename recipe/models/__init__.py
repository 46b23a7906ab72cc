"""Teacher and student VLMs: loading, tiny presets, the pairing check and the three Switch-KD passes."""
from recipe.models.compat import IncompatiblePair, PairCheck, check_pair
from recipe.models.loading import (
                                   image_token_count,
                                   load_image_processor,
                                   load_tokenizer,
                                   load_vlm,
                                   pick_attention,
                                   same_preprocessing,
                                   vision_feature_width,
)
from recipe.models.switch import (
                                   PassOutputs,
                                   SwitchKDModel,
                                   enable_switch_checkpointing,
                                   run_passes,
                                   supervised_positions,
)

__all__ = ["IncompatiblePair", "PairCheck", "check_pair", "image_token_count", "load_image_processor", "load_tokenizer",
           "load_vlm", "pick_attention", "same_preprocessing", "vision_feature_width", "PassOutputs", "SwitchKDModel",
           "enable_switch_checkpointing", "run_passes", "supervised_positions"]

"""Start-up check that a teacher and a student can be distilled with the switch pass (docs/method.md,
"The three passes")."""
from __future__ import annotations

from recipe.models.loading import image_token_count, vision_feature_width


class IncompatiblePair(ValueError):
    """Teacher and student cannot be paired; the message names every mismatch with both values."""


def _special_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_id", None) for name in ("pad_token", "eos_token", "bos_token")}


def check_pair(teacher_config, student_config, teacher_tokenizer=None, student_tokenizer=None) -> None:
    """Raise IncompatiblePair naming each mismatch; return None when the pair works."""
    problems = []

    def compare(what, teacher_value, student_value):
        if teacher_value != student_value:
            problems.append(f"{what}: teacher {teacher_value} vs student {student_value}")

    # P_T receives E_S's features in the switch pass: widths and token counts must agree.
    compare("vision feature width (student E_S output -> teacher projector input)",
            vision_feature_width(teacher_config), vision_feature_width(student_config))
    compare("image tokens per image", image_token_count(teacher_config), image_token_count(student_config))
    compare("vocabulary size", teacher_config.text_config.vocab_size, student_config.text_config.vocab_size)
    compare("image token id", teacher_config.image_token_id, student_config.image_token_id)
    if teacher_tokenizer is not None and student_tokenizer is not None:
        compare("tokenizer length", len(teacher_tokenizer), len(student_tokenizer))
        compare("special token ids", _special_ids(teacher_tokenizer), _special_ids(student_tokenizer))
        teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        shared = teacher_vocab.keys() & student_vocab.keys()
        differing = sorted(t for t in shared if teacher_vocab[t] != student_vocab[t])
        if differing or teacher_vocab.keys() != student_vocab.keys():
            sample = differing[:3] or sorted(teacher_vocab.keys() ^ student_vocab.keys())[:3]
            problems.append(f"token ids differ for {len(differing)} shared tokens and "
                            f"{len(teacher_vocab.keys() ^ student_vocab.keys())} unshared ones (e.g. {sample})")
    if problems:
        raise IncompatiblePair("teacher and student are incompatible for Switch-KD:\n  - " + "\n  - ".join(problems))

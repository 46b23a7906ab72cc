"""Start-up check that a teacher and a student can be distilled with the switch pass (docs/method.md,
"The three passes")."""
from __future__ import annotations

from dataclasses import dataclass, field

from recipe.models.families import family_of


class IncompatiblePair(ValueError):
    """Teacher and student cannot be paired; the message names every mismatch with both values."""


@dataclass
class PairCheck:
    """What the pair check settled.

    shared_vocab: the leading vocabulary ids both models' losses are compared over (the smaller table; the other's
    extra rows are padding or tokens the student's tokenizer never produces). image_token_id: the id that marks
    image positions for both models (the student's: its tokenizer encodes the data of every pass). notes: what
    was reconciled, one line each, for the start-up log.
    """
    shared_vocab: int
    image_token_id: int
    notes: list[str] = field(default_factory=list)


def _special_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_id", None) for name in ("pad_token", "eos_token", "bos_token")}


def _id_ranges(ids: list[int]) -> str:
    ranges, start = [], None
    for i, current in enumerate(ids):
        start = current if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != current + 1:
            ranges.append(str(start) if start == current else f"{start}-{current}")
            start = None
    return ", ".join(ranges)


def _reconcile_tokenizers(teacher_config, student_config, teacher_tokenizer, student_tokenizer, shared: int):
    """(problems, notes): the teacher must read every id the student's tokenizer produces (the data and the
    template are encoded with it) as the same token; the rest of its tokenizer never reaches the models."""
    problems, notes = [], []
    student = {i: token for token, i in student_tokenizer.get_vocab().items()}
    teacher = {i: token for token, i in teacher_tokenizer.get_vocab().items()}
    student_image, teacher_image = student_config.image_token_id, teacher_config.image_token_id
    differing = [i for i in sorted(student) if i != student_image and teacher.get(i) != student[i]]
    if differing:
        lengths = (f"tokenizer length: teacher {len(teacher_tokenizer)} vs student {len(student_tokenizer)}; "
                   if len(teacher_tokenizer) != len(student_tokenizer) else "")
        sample = ", ".join(f"id {i}: student {student[i]!r} vs teacher {teacher.get(i)!r}" for i in differing[:3])
        problems.append(f"{lengths}token ids differ for {len(differing)} of the student tokenizer's ids "
                        f"(e.g. {sample})")
    highest = max(student)
    if highest >= shared:
        problems.append(f"vocabulary size: teacher {teacher_config.text_config.vocab_size} vs student "
                        f"{student_config.text_config.vocab_size}, and the student's tokenizer produces ids up to "
                        f"{highest}")
    elif teacher_config.text_config.vocab_size != student_config.text_config.vocab_size:
        notes.append(f"vocabulary: teacher {teacher_config.text_config.vocab_size} rows vs student "
                     f"{student_config.text_config.vocab_size}; the losses compare the first {shared} ids, which hold "
                     f"every id the student's tokenizer produces (up to {highest})")
    unused = sorted(set(teacher) - set(student))
    if unused:
        names = ", ".join(repr(teacher[i]) for i in unused[:4]) + (", ..." if len(unused) > 4 else "")
        notes.append(f"the teacher's tokenizer has {len(unused)} tokens the student's tokenizer never produces "
                     f"(ids {_id_ranges(unused)}: {names}); the data never holds them")
    if student_image != teacher_image:
        if student_image >= teacher_config.text_config.vocab_size:
            problems.append(f"image token id: teacher {teacher_image} vs student {student_image}, outside the "
                            f"teacher's {teacher_config.text_config.vocab_size}-row table")
        else:
            notes.append(f"image token: the student's id {student_image} marks image positions in both passes (the "
                         f"teacher's tokenizer has {teacher.get(student_image)!r} there, its own image token is "
                         f"{teacher_image})")
    teacher_special, student_special = _special_ids(teacher_tokenizer), _special_ids(student_tokenizer)
    if teacher_special != student_special and not differing:
        notes.append(f"special token roles: teacher {teacher_special} vs student {student_special}; the data is "
                     f"encoded with the student's tokenizer, whose ids both read alike")
    return problems, notes


def shared_vocabulary(teacher_config, student_config) -> int:
    """The id range the divergences compare: the smaller of the two tables (the other's extra rows are padding
    or trailing tokens; _reconcile_tokenizers checks that no id the data can hold lies beyond it)."""
    return min(teacher_config.text_config.vocab_size, student_config.text_config.vocab_size)


def _vision_problems(teacher_config, student_config, teacher_image_processor, student_image_processor) -> list[str]:
    """P_T receives E_S's features in the switch pass: same family, same feature width, and the same image-token
    count for every image (patch size, merge factor, pixel bounds: the family's vision_settings)."""
    teacher_family, student_family = family_of(teacher_config), family_of(student_config)
    if teacher_config.model_type != student_config.model_type:
        return [f"model family: teacher {teacher_config.model_type} ({teacher_family.name}) vs student "
                f"{student_config.model_type} ({student_family.name}); the switch pass feeds the student's vision "
                f"features to the teacher's projector, which needs the same family"]
    with_processors = teacher_image_processor is not None and student_image_processor is not None
    teacher_settings = teacher_family.vision_settings(teacher_config, teacher_image_processor if with_processors
                                                      else None)
    student_settings = student_family.vision_settings(student_config, student_image_processor if with_processors
                                                      else None)
    return [f"{what}: teacher {teacher_settings[what]} vs student {student_settings[what]}"
            for what in teacher_settings if teacher_settings[what] != student_settings[what]]


def check_pair(teacher_config, student_config, teacher_tokenizer=None, student_tokenizer=None,
               teacher_image_processor=None, student_image_processor=None) -> PairCheck:
    """Raise IncompatiblePair naming each mismatch with both values; else what was reconciled.

    Without tokenizers the vocabularies must match exactly (size and image token id). With them, the pair
    only needs the teacher to read every id the student's tokenizer can produce as the same token: tables
    may differ by padding rows or trailing tokens, Qwen2.5's extra special tokens are fine next to Qwen2.
    With both image processors, their settings that fix the image-token count are compared too.
    """
    problems = _vision_problems(teacher_config, student_config, teacher_image_processor, student_image_processor)

    def compare(what, teacher_value, student_value):
        if teacher_value != student_value:
            problems.append(f"{what}: teacher {teacher_value} vs student {student_value}")

    shared = shared_vocabulary(teacher_config, student_config)
    notes = []
    if teacher_tokenizer is None or student_tokenizer is None:
        compare("vocabulary size", teacher_config.text_config.vocab_size, student_config.text_config.vocab_size)
        compare("image token id", teacher_config.image_token_id, student_config.image_token_id)
    else:
        found, notes = _reconcile_tokenizers(teacher_config, student_config, teacher_tokenizer, student_tokenizer,
                                             shared)
        problems += found
    if problems:
        raise IncompatiblePair("teacher and student are incompatible for Switch-KD:\n  - " + "\n  - ".join(problems))
    return PairCheck(shared_vocab=shared, image_token_id=student_config.image_token_id, notes=notes)

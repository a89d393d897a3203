"""Benchmark evaluation inside the loop: GSM8K, MATH(-500), ARC-Challenge/Easy, MMLU, HumanEval, MBPP.

- :mod:`~middo_ray.evalsuite.answers`: final-answer extraction and normalisation (GSM8K, MATH); pure.
- :mod:`~middo_ray.evalsuite.code`: program assembly and sandboxed execution (HumanEval, MBPP).
- :mod:`~middo_ray.evalsuite.benchmarks`: benchmark files to items (subsets, few-shot), one scorer each.
- :mod:`~middo_ray.evalsuite.runner`: the evaluation actor (loss, option log-likelihood, greedy
  generation) and the Ray Data pipeline that runs it; the flat metrics dict.

Configured by ``eval.suites`` (see :class:`middo_ray.config.EvalConfig`); docs/evaluation.md describes
each scorer exactly.
"""

from middo_ray.evalsuite.answers import (extract_boxed, extract_gsm8k_answer, extract_math_answer,
                                         math_answers_equal, normalize_math_answer, normalize_number,
                                         score_gsm8k, score_math)
from middo_ray.evalsuite.benchmarks import BENCHMARKS, pick_subset, score_item, score_mc, suite_items
from middo_ray.evalsuite.code import (ExecResult, extract_code, humaneval_program, mbpp_program,
                                      run_program)

__all__ = [
    "BENCHMARKS", "ExecResult", "extract_boxed", "extract_code", "extract_gsm8k_answer", "extract_math_answer",
    "humaneval_program", "math_answers_equal", "mbpp_program", "normalize_math_answer", "normalize_number",
    "pick_subset", "run_program", "score_gsm8k", "score_item", "score_math", "score_mc", "suite_items",
]

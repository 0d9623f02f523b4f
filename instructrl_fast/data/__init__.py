"""Data: tokenizers, the embedded demonstration task, the gold labeler, and JSONL loaders for user data."""

from instructrl_fast.data.jsonl import load_comparisons_jsonl, load_prompts_jsonl, load_sft_jsonl, save_jsonl
from instructrl_fast.data.labeler import Assessment, GoldLabeler, assess
from instructrl_fast.data.task import KINDS, TOXIC_WORDS, DemoTask, Prompt, contains_toxic, parse_prompt
from instructrl_fast.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "KINDS", "TOXIC_WORDS", "Assessment", "ByteTokenizer", "DemoTask", "GoldLabeler", "HFTokenizer", "Prompt",
    "assess", "contains_toxic", "load_comparisons_jsonl", "load_prompts_jsonl", "load_sft_jsonl", "load_tokenizer",
    "parse_prompt", "save_jsonl",
]

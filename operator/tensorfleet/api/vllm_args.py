"""Reading vLLM's own flags out of ``spec.runtime.extraArgs`` the way vLLM's argument parser reads them.

Metering prices records at the precision vLLM runs (``--quantization``/``-q``, else ``--dtype``) and
seeds its step budget from ``--max-num-batched-tokens``, so these are read exactly as vLLM reads them:
``--flag V``, ``--flag=V``, the short alias (``-q V``, ``-q=V``, ``-qV``), underscores in long names
(vLLM's ``FlexibleArgumentParser`` turns ``--max_num_batched_tokens`` into ``--max-num-batched-tokens``)
and abbreviations (argparse's ``allow_abbrev``, which vLLM keeps: ``--dtyp half`` is ``--dtype half``).
An abbreviation that is also a prefix of another vLLM flag (``--quant``: ``--quantization-config``) stops
vLLM at start, so reading it as the metered flag never prices a running engine wrong; no vLLM flag is a
strict prefix of the three. The last occurrence wins, as in argparse.

What cannot be read is ``--config FILE``: its flags live in a file the operator never sees.

Integer flags take vLLM's human-readable integers (``4096``, ``4k`` = 4000, ``4K`` = 4096, ``25.6k``).
"""

from __future__ import annotations

import re

QUANTIZATION = ("--quantization", "-q")
DTYPE = ("--dtype",)
STEP_TOKENS = ("--max-num-batched-tokens",)
MAX_MODEL_LEN = ("--max-model-len",)
CONFIG_FILE = "--config"

# vLLM's --quantization methods whose precision the resource-unit table has (weights and math), and --dtype.
QUANTIZATION_PRECISION = {"fp8": "fp8", "fbgemm_fp8": "fp8", "awq": "int4-awq", "awq_marlin": "int4-awq"}
DTYPE_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def _long_name(arg: str) -> str:
    """An argument's option name as vLLM parses it: the part before ``=``, underscores of a long name as dashes."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def _names(arg: str, names: tuple[str, ...]) -> bool:
    name = _long_name(arg)
    return name in names or (name.startswith("--") and len(name) > 2 and names[0].startswith(name))


def flag(args: tuple[str, ...] | list[str], names: tuple[str, ...]) -> tuple[int, str] | None:
    """Where the option spelt ``names`` (its long name first, then aliases) is set last in ``args`` and the
    value vLLM gets for it."""
    found = None
    for i, arg in enumerate(args):
        if _names(arg, names):
            if "=" in arg:
                found = i, arg.split("=", 1)[1]
            elif i + 1 < len(args):
                found = i, args[i + 1]
        else:
            short = next((n for n in names if len(n) == 2 and arg.startswith(n) and len(arg) > 2), None)
            if short is not None:  # -qfp8: argparse's attached short value
                found = i, arg[2:]
    return found


def flag_value(args: tuple[str, ...] | list[str], names: tuple[str, ...]) -> str | None:
    """The value vLLM gets for the option spelt ``names`` in ``args``, or None when it is not set."""
    found = flag(args, names)
    return None if found is None else found[1]


_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str) -> int | None:
    """A vLLM human-readable integer's value (``4k`` = 4000, ``4K`` = 4096), or None when vLLM refuses it."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    match = _HUMAN_INT.fullmatch(text)
    if match is None:
        return None
    number, suffix = match.groups()
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    return int(number) * _BINARY[suffix] if number.isdigit() else None  # vLLM: no decimals with K, M, G, T


def precision(args: tuple[str, ...] | list[str]) -> str:
    """The precision vLLM runs with these arguments, as the resource-unit table names it: ``--quantization``, else
    ``--dtype``; a method the table has no row for, ``auto``, or neither flag is fp16."""
    quantization = flag_value(args, QUANTIZATION)
    if quantization is not None:
        return QUANTIZATION_PRECISION.get(quantization, "fp16")
    return DTYPE_PRECISION.get(flag_value(args, DTYPE) or "auto", "fp16")


def config_file_index(args: tuple[str, ...] | list[str]) -> int | None:
    """Where ``--config FILE`` is, if it is: flags in the file are not read here."""
    return next((i for i, arg in enumerate(args) if _long_name(arg) == CONFIG_FILE), None)

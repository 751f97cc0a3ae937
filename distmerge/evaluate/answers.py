"""Answers out of completions and references, as the papers' evaluation code extracts them.

GSM8K and MATH follow MergeLM's ``utils/evaluate_llms_utils.py`` (itself WizardMath's ``inference/util.py`` and
the Hendrycks MATH normalization), quirks included: the final number is the first number after the last
"The answer is: ", rounded to an integer with Python's ``round`` (so 2.5 -> 2), and "1,234,567" reads as 1234
because the pattern allows one separator; a MATH answer is compared after ``strip_string``, and any exception
inside the normalization falls back to comparing the raw strings. One addition: a MATH completion without
"The answer is: " is read from its last ``\\boxed{}`` (models trained on boxed answers would otherwise score 0;
WizardMath completions always take the first path, so their scores are unchanged).

Code completions follow MergeLM's post-processing for HumanEval and MBPP (fenced block, ``__main__`` guard,
"# Example usage", "# Test examples", code-alpaca's "The solution is:" / "The answer is:").
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

ANSWER_MARK = "The answer is: "
_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False


def extract_final_number(completion: str) -> int | None:
    """GSM8K: the number after the last "The answer is: ", rounded to an int; None when there is none."""
    parts = completion.split(ANSWER_MARK)
    if len(parts) < 2:
        return None
    match = _NUMBER.search(parts[-1].strip())
    if not match:
        return None
    found = match.group()
    if "/" in found:
        numerator, denominator = found.split("/")[0], found.split("/")[1]
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        fraction = Fraction(found.replace(",", ""))
        return round(float(fraction.numerator / fraction.denominator))
    value = float(found.replace(",", ""))
    if value == float("inf"):
        return None
    return round(value)


def gsm8k_reference(answer_field: str) -> int:
    """The integer after '#### ' in a GSM8K answer ("... #### 1,234" -> 1234)."""
    if "#### " not in answer_field:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got {answer_field[-40:]!r}")
    return int(answer_field.split("#### ")[1].replace(",", "").strip())


def gsm8k_correct(completion: str, reference: int | float) -> bool:
    predicted = extract_final_number(completion)
    return predicted is not None and float(predicted) == float(reference)


# --- MATH -------------------------------------------------------------------------------------------

def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx : i + 1]
    return None


def remove_boxed(text: str | None) -> str | None:
    left = "\\boxed{"
    if text is None or not text.startswith(left) or not text.endswith("}"):
        return None
    return text[len(left) : -1]


def math_reference(solution: str) -> str | None:
    """The answer of a MATH solution: the content of its last ``\\boxed{}``."""
    return remove_boxed(last_boxed_only_string(solution))


def extract_math_answer(completion: str) -> str | None:
    """MergeLM's ``process_results`` cut: after the last "The answer is: ", up to ".\\n", one trailing '.' dropped.

    Without that phrase, the content of the last ``\\boxed{}`` (see the module docstring); else None.
    """
    parts = completion.split(ANSWER_MARK)
    if len(parts) > 1:
        answer = parts[-1].split(".\n")[0].strip()
        if answer.endswith("."):
            answer = answer[:-1]
        return answer.strip()
    return remove_boxed(last_boxed_only_string(completion))


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":  # IndexError on a bare trailing \frac: is_equiv falls back to raw comparison
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b = substr[0], substr[1]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + substr[2:]
        else:
            new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    a_int, b_int = int(a), int(b)  # a ValueError escapes to is_equiv's raw comparison, as in the reference
    if string != f"{a_int}/{b_int}":
        return string
    return "\\frac{" + str(a_int) + "}{" + str(b_int) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:
            raise ValueError("more than one unit")  # the reference's assert: is_equiv compares raw strings
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def strip_string(string: str) -> str:
    """Hendrycks MATH normalization of an answer string (may raise; see ``is_equiv``)."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")  # the reference also replaces "\%", the same two characters
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(a: str | None, b: str | None) -> bool:
    if a is None and b is None:
        return True
    if a is None or b is None:
        return False
    try:
        return strip_string(a) == strip_string(b)
    except Exception:
        return a == b


def math_correct(completion: str, reference: str | None) -> bool:
    answer = extract_math_answer(completion)
    if answer is None:
        return False
    return is_equiv(answer, reference)


# --- code -------------------------------------------------------------------------------------------

def _cut_after(text: str, marker: str, end: str) -> str:
    text = text[text.index(marker):].strip().replace(marker, "")
    try:
        return text[: text.index(end)].strip()
    except ValueError:
        return text.strip()


def extract_code(completion: str, fence_end: str = "```", test_marker: bool = False) -> str:
    """MergeLM's post-processing of a code completion (HumanEval: ``fence_end='```'``; MBPP: ``'\\n```'`` and
    ``test_marker=True``)."""
    code = completion.split("### Response:")[-1].replace("\t", "    ").replace("\r", "").strip()
    if "```python" in code:
        code = code[code.index("```python"):].strip().replace("```python", "")
        try:
            code = code[: code.index(fence_end)].strip()
        except ValueError:
            pass
    if '__name__ == "__main__"' in code and 'if __name__ == "__main__":' in code:
        code = code[: code.index('if __name__ == "__main__":')].strip()
    if "# Example usage" in code:
        code = code[: code.index("# Example usage")].strip()
    if test_marker and "# Test examples" in code:
        code = code[: code.index("# Test examples")].strip()
    for marker in ("The solution is:", "The answer is:"):  # code-alpaca's phrasing
        if marker in code:
            code = _cut_after(code, marker, "\n\nThe answer is:")
    return code


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the earliest stop string (what vLLM returns when generation stops on it)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]

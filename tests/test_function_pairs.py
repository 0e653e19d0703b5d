"""HumanEval-shaped pairs from real code (`peft_parscale.function_pairs`): what is extracted, how it is laid out, and
what the corpus-level filters, decontamination and split drop or keep. Expected pairs are written out by hand."""

import hashlib

import pytest
from trl.data_utils import is_conversational

from peft_parscale.function_pairs import DROP_REASONS, as_conversations, extract_functions, function_pairs
from peft_parscale.humaneval import CHAT_INSTRUCTION, load_problems

MODULE = '''"""A module."""
import functools
import os
import re as regex
from typing import Dict, List, Tuple
from . import sibling
from collections import *

try:
    import json
except ImportError:
    json = None


@functools.lru_cache(maxsize=None)
def split_words(text: str,
                separator: str = ",") -> List[str]:
    """Split text at separator and strip each word of white space.

    >>> split_words("a, b")
    ['a', 'b']
    """
    # empty pieces are dropped
    words = [word.strip() for word in regex.split(separator, text)]
    return [word for word in words if word]


def with_helper(values):
    """Sum the squares of the values, with a nested helper function."""
    def square(value):
        """Square one value."""
        return value * value
    return sum(square(value) for value in values)


def no_docstring(x):
    return x + 1


async def fetch(url):
    """Fetch the url asynchronously and return its text."""
    await sibling.get(url)
    return url


def uses_sibling(path):
    """Join the path with the sibling module's root directory name."""
    root = sibling.ROOT
    return os.path.join(root, path)


class Tools:
    def count(self, text):
        """Count the words of the text with this object's separator."""
        return len(text.split(self.separator))

    def shout(self, text: str) -> str:
        """Upper-case the text and add an exclamation mark."""
        loud = text.upper()
        return loud + "!"

    @staticmethod
    def pairs(items: List[int]) -> List[Tuple[int, int]]:
        """Consecutive pairs of the items, as a list of tuples."""
        result = []
        for first, second in zip(items, items[1:]):
            result.append((first, second))
        return result

    @staticmethod
    def banner(name):
        """A two-line banner greeting the name, as one string."""
        text = """Hello
            {}
"""
        return text.format(name)
'''

# The decorator is left out and the signature is written on one line (as ast.unparse writes it); only the imports
# the function uses come along, cut down to the names it uses, with HumanEval's two blank lines after them.
SPLIT_WORDS = (
    (
        "import re as regex\n"
        "from typing import List\n"
        "\n"
        "\n"
        "def split_words(text: str, separator: str=',') -> List[str]:\n"
        '    """Split text at separator and strip each word of white space.\n'
        "\n"
        '    >>> split_words("a, b")\n'
        "    ['a', 'b']\n"
        '    """\n'
    ),
    (
        "    # empty pieces are dropped\n"
        "    words = [word.strip() for word in regex.split(separator, text)]\n"
        "    return [word for word in words if word]\n"
    ),
)
# a nested def stays in its enclosing function's body
WITH_HELPER = (
    'def with_helper(values):\n    """Sum the squares of the values, with a nested helper function."""\n',
    (
        '    def square(value):\n        """Square one value."""\n        return value * value\n'
        "    return sum(square(value) for value in values)\n"
    ),
)
# a method that never uses `self` becomes a top-level function without it; the body moves from 8 to 4 spaces
SHOUT = (
    'def shout(text: str) -> str:\n    """Upper-case the text and add an exclamation mark."""\n',
    '    loud = text.upper()\n    return loud + "!"\n',
)
PAIRS = (
    (
        "from typing import List, Tuple\n\n\n"
        "def pairs(items: List[int]) -> List[Tuple[int, int]]:\n"
        '    """Consecutive pairs of the items, as a list of tuples."""\n'
    ),
    (
        "    result = []\n    for first, second in zip(items, items[1:]):\n        result.append((first, second))\n"
        "    return result\n"
    ),
)
USES_SIBLING = (
    'import os\n\n\ndef uses_sibling(path):\n    """Join the path with the sibling module\'s root directory name."""\n',
    "    root = sibling.ROOT\n    return os.path.join(root, path)\n",
)


def pairs_by_name(functions):
    return {function.name: (function.prompt, function.completion) for function in functions}


def test_extractor_lays_functions_out_as_humaneval_problems():
    functions, dropped = extract_functions(MODULE)
    assert pairs_by_name(functions) == {
        "split_words": SPLIT_WORDS,
        "with_helper": WITH_HELPER,
        "shout": SHOUT,
        "pairs": PAIRS,
    }
    # 10 functions: square is nested; no_docstring; fetch is async; count uses self; uses_sibling needs a relative
    # import; banner's string would change if its lines moved from 8 to 4 spaces
    assert dropped == {
        "functions": 10,
        "nested": 1,
        "no_docstring": 1,
        "async": 1,
        "method_uses_instance": 1,
        "unresolved_names": 1,
        "not_reindentable": 1,
    }


def test_extractor_keeps_functions_with_unresolved_names_when_asked():
    functions, dropped = extract_functions(MODULE, self_contained=False)
    assert pairs_by_name(functions)["uses_sibling"] == USES_SIBLING  # os imported, sibling (relative) not
    assert "unresolved_names" not in dropped


def test_rendered_functions_behave_like_the_originals():
    original: dict = {}
    # running the original and the rendered function is the point here: both are this file's own code
    exec(compile(MODULE.replace("from . import sibling\n", ""), "module", "exec"), original)  # noqa: S102
    for name, arguments in [("split_words", ("a, ,b",)), ("shout", ("hey",)), ("pairs", ([1, 2, 3],))]:
        prompt, completion = pairs_by_name(extract_functions(MODULE)[0])[name]
        rendered: dict = {}
        exec(compile(prompt + completion, name, "exec"), rendered)  # noqa: S102
        expected = original[name] if name == "split_words" else getattr(original["Tools"](), name)
        assert rendered[name](*arguments) == expected(*arguments)


def test_line_endings_and_form_feeds_do_not_shift_lines():
    tail = MODULE[MODULE.index("def with_helper") :]
    source = "import os\r\n\x0c\r\n" + tail.replace("\n", "\r\n")  # a form feed line (as in the stdlib), CRLF
    functions, _ = extract_functions(source)
    assert pairs_by_name(functions)["with_helper"] == WITH_HELPER


def module_with(name: str, docstring: str, body: str, imports: str = "") -> str:
    return f'{imports}def {name}(numbers, threshold):\n    """{docstring}"""\n{body}'


CLEAN_BODY = "    total = 0.0\n    for value in numbers:\n        total += value * threshold\n    return total\n"


def path_bucket(path: str) -> int:
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 100


def test_function_pairs_filters_counts_and_splits_by_file():
    generated = {
        f"gen/module_{index:02d}.py": module_with(
            f"scale_{index}", "Scale and sum the numbers by the threshold.", CLEAN_BODY.replace("0.0", f"{index}.0")
        )
        for index in range(40)
    }
    files = {
        **generated,
        "pkg/copy.py": module_with("scale_copy", "The same body as gen/module_00.py under another name.", CLEAN_BODY),
        "pkg/tests/test_scale.py": module_with("check_scale", "A test module's function is never taken.", CLEAN_BODY),
        "pkg/broken.py": "def broken(:\n",
        "pkg/short.py": module_with("short_doc", "Too short.", CLEAN_BODY)
        + module_with("one_line", "A body of a single line is too short to learn from.", "    return numbers\n"),
    }
    pairs, stats = function_pairs([{"path": path, "text": text} for path, text in files.items()], heldout_percent=30)
    assert {key: stats[key] for key in ("files", "test_files", "unparsable_files", "functions")} == {
        "files": 44,
        "test_files": 1,
        "unparsable_files": 1,
        "functions": 43,  # 40 generated, the copy, and two in short.py
    }
    assert stats["duplicate"] == 1 and stats["short_docstring"] == 1 and stats["short_body"] == 1
    assert stats["functions"] == sum(stats[reason] for reason in DROP_REASONS) + stats["train"] + stats["test"]
    expected_test = sorted(path for path in generated if path_bucket(path) < 30)
    assert sorted(pairs["test"]["path"]) == expected_test and 0 < len(expected_test) < 40
    assert sorted(pairs["train"]["path"]) == sorted(set(generated) - set(expected_test))
    row = pairs["train"][0] if pairs["train"][0]["name"] == "scale_0" else pairs["test"][0]
    assert row["prompt"] == (
        'def scale_0(numbers, threshold):\n    """Scale and sum the numbers by the threshold."""\n'
    )
    assert row["completion"] == CLEAN_BODY


def test_decontamination_drops_planted_humaneval_solutions():
    (problem,) = load_problems(["HumanEval/0"])
    solution = problem["canonical_solution"]
    edited = "    seen = []\n" + solution.replace("    return False\n", "    return bool(seen)\n")
    shared_line = (
        "    total = 0.0\n    for idx, elem in enumerate(numbers):\n        total += elem * idx\n    return total\n"
    )
    files = {
        "a.py": module_with("close_pairs", "An exact copy of HumanEval/0's canonical solution.", solution),
        # layout and comments do not hide a copy (bodies compare by ast.dump)
        "b.py": module_with(
            "close_again",
            "The same copy, with a comment and no blank line.",
            solution.replace("\n\n", "\n    # done\n"),
        ),
        "c.py": module_with("close_edited", "A copy with a line added and the last line changed.", edited),
        "d.py": module_with("has_close_elements", "Named like the entry point, with another body.", CLEAN_BODY),
        "e.py": module_with("weighted_sum", "Shares only one line (an idiom) with the solution.", shared_line),
    }
    pairs, stats = function_pairs([{"path": path, "text": text} for path, text in files.items()], heldout_percent=1)
    assert (stats["humaneval_body"], stats["humaneval_ngram"], stats["humaneval_name"]) == (2, 1, 1)
    kept = list(pairs["train"]["name"]) + list(pairs["test"]["name"])
    assert kept == ["weighted_sum"]


def test_function_pairs_refuses_a_bad_split():
    with pytest.raises(ValueError, match="heldout_percent"):
        function_pairs([], heldout_percent=0, problems=[])


def test_conversational_variant_is_trl_s_prompt_completion_format():
    pairs, _ = function_pairs([{"path": "m.py", "text": MODULE}], heldout_percent=1)
    split = pairs["test" if path_bucket("m.py") < 1 else "train"]
    row = as_conversations(split)[list(split["name"]).index("pairs")]
    assert is_conversational(row) and set(row) == {"prompt", "completion"}
    assert row["prompt"] == [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=PAIRS[0])}]
    assert row["completion"] == [{"role": "assistant", "content": "```python\n" + PAIRS[0] + PAIRS[1] + "```"}]

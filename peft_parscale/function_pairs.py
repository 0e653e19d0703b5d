"""HumanEval-shaped training pairs from real code: a function's imports, signature and docstring, then its body.

HumanEval asks a model to complete a function from its signature and docstring. Training on raw source teaches
continuation of files instead; this module turns the Python corpora of `peft_parscale.data` (the standard library,
installed packages) into pairs in the benchmark's own shape, with no download:

- **prompt**: the module-level imports the function uses, two blank lines, ``def name(...):`` (one line, as
  ``ast.unparse`` writes it, decorators left out) and the docstring as written, indented by four spaces;
- **completion**: the body after the docstring, comments included, indented by four spaces and ending with a newline,
  so that ``prompt + completion`` is the function, as a HumanEval prompt plus its canonical solution is.

Which functions, and why:

- Module-level functions are taken. Functions nested in another function are not taken on their own: they may close
  over the enclosing function's variables, which the prompt cannot show (they stay in their enclosing function's body).
- Methods are taken only when they do not use their instance or class: a ``@staticmethod``, or a method whose first
  parameter (and ``super()``/``__class__``) never appears in its body. Such a method is a function in all but place;
  it is rendered as a top-level one without that parameter. A method that uses ``self`` depends on state the prompt
  cannot show.
- ``async def`` functions are left out: HumanEval has none, and their bodies need an event loop to run.
- Functions without a docstring are left out (there is nothing to prompt with).
- ``self_contained``: every global name the function reads must be a builtin or come from an absolute module-level
  import of its file (which the prompt then carries), as in HumanEval, where ``prompt + completion`` runs on its own.
- Each pair is checked by parsing it: its body and docstring must equal the original's (``ast.dump``, and the docstring
  as ``inspect.cleandoc`` cleans it), or the function is left out (re-indenting would change a string in it).

Then, over the whole corpus: length filters, decontamination against HumanEval (`HumanEvalIndex`: no function named
like a function of a HumanEval prompt, none whose normalised body equals a canonical solution's, none that contains
half of a canonical solution's token 10-grams), deduplication by normalised body (the first in corpus order is kept),
and the by-file hash split of `peft_parscale.data` (`is_heldout`). Every drop is counted.

Example::

    from itertools import chain
    from peft_parscale.data import python_packages_corpus, python_stdlib_corpus
    from peft_parscale.function_pairs import function_pairs, as_conversations

    files = chain(*python_stdlib_corpus().values(), *python_packages_corpus().values())
    pairs, stats = function_pairs(files)      # DatasetDict "train"/"test": prompt, completion, name, path
    chat = as_conversations(pairs["train"])   # TRL's conversational prompt-completion format
"""

from __future__ import annotations

import ast
import builtins
import copy
import io
import symtable
import tokenize
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from datasets import Dataset, DatasetDict, Features, Value

from .data import PACKAGE_TEST_DIRECTORIES, PACKAGE_TEST_FILES, is_heldout

INDENT = "    "
NGRAM = 10  # tokens; see HumanEvalIndex
NGRAM_CONTAINMENT = 0.5
BUILTIN_NAMES = frozenset(dir(builtins))
LAYOUT_TOKENS = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT}
PAIR_FEATURES = Features({name: Value("string") for name in ("prompt", "completion", "name", "path")})
# the drop reasons, in the order the filters apply (a function is counted under the first that drops it)
DROP_REASONS = (
    "nested",
    "async",
    "method_uses_instance",
    "no_docstring",
    "short_docstring",
    "short_body",
    "long_body",
    "not_reindentable",
    "unresolved_names",
    "humaneval_name",
    "humaneval_body",
    "humaneval_ngram",
    "duplicate",
)


@dataclass(frozen=True)
class ExtractedFunction:
    """One function as a HumanEval-shaped pair, with what the corpus-level filters need."""

    name: str
    prompt: str
    completion: str
    docstring: str  # cleaned (inspect.cleandoc, trailing white space removed)
    body_key: str  # ast.dump of the body without its docstring: equal for bodies that differ only in layout/comments
    body_tokens: tuple[str, ...]  # the body's tokens as ast.unparse writes it, without layout tokens and comments


def is_test_file(path: str) -> bool:
    """Whether a relative path is a test module by the rules of `data.package_python_files` (``test``, ``tests``,
    ``testing`` directories, ``test_*.py``, ``*_test.py``, ``conftest.py``): such functions are assertions about other
    code, not code to learn from."""
    relative = PurePosixPath(path)
    in_test_directory = PACKAGE_TEST_DIRECTORIES.intersection(relative.parts[:-1])
    return bool(in_test_directory) or any(relative.match(pattern) for pattern in PACKAGE_TEST_FILES)


def body_tokens(statements: list[ast.stmt]) -> tuple[str, ...]:
    """The tokens of ``statements`` as ``ast.unparse`` writes them (comments and formatting normalised away)."""
    source = ast.unparse(ast.Module(body=statements, type_ignores=[]))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return tuple(token.string for token in tokens if token.type not in LAYOUT_TOKENS)


def body_key(statements: list[ast.stmt]) -> str:
    return ast.dump(ast.Module(body=statements, type_ignores=[]))


def _docstring(function: ast.FunctionDef) -> str | None:
    """The docstring as ``inspect.cleandoc`` cleans it, without trailing white space (which re-indenting changes)."""
    docstring = ast.get_docstring(function)
    return None if docstring is None else "\n".join(line.rstrip() for line in docstring.strip().split("\n"))


def _without_docstring(function: ast.FunctionDef) -> list[ast.stmt]:
    return function.body[1:] if ast.get_docstring(function, clean=False) is not None else function.body


def _module_imports(module: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported: at module level, also inside ``if``/``try``/``with``."""
    found, pending = [], list(module.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            blocks = [getattr(node, field, []) for field in ("body", "orelse", "finalbody")]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            pending = [statement for block in blocks for statement in block] + pending
    return found


def _bound_names(statement: ast.Import | ast.ImportFrom) -> list[tuple[str, ast.alias]]:
    """(name bound, alias) of an import; a relative import, a star import or ``__future__`` binds nothing usable."""
    if isinstance(statement, ast.ImportFrom):
        if statement.level or statement.module == "__future__":
            return []
        return [(alias.asname or alias.name, alias) for alias in statement.names if alias.name != "*"]
    return [(alias.asname or alias.name.split(".")[0], alias) for alias in statement.names]


def _global_names(function_source: str, own_name: str) -> set[str]:
    """The global names the function's code reads or writes (signature included), from the compiler's symbol tables."""
    module = symtable.symtable(function_source, "<function>", "exec")
    names = {
        symbol.get_name()
        for symbol in module.get_symbols()
        if symbol.is_referenced() and not (symbol.is_assigned() or symbol.is_imported())
    }
    pending = list(module.get_children())
    while pending:
        table = pending.pop()
        names |= {symbol.get_name() for symbol in table.get_symbols() if symbol.is_global()}
        pending += table.get_children()
    return names - {own_name}


def _uses_name(function: ast.FunctionDef, name: str) -> bool:
    """Whether ``name`` (or ``super``/``__class__``, which reach the instance's class) appears in the body."""
    targets = {name, "super", "__class__"}
    return any(isinstance(node, ast.Name) and node.id in targets for node in ast.walk(ast.Module(function.body, [])))


def _drop_first_parameter(arguments: ast.arguments) -> ast.arguments | None:
    arguments = copy.copy(arguments)
    positional = len(arguments.posonlyargs) + len(arguments.args)
    if positional == 0:
        return None
    if len(arguments.defaults) == positional:  # defaults align with the last positional parameters
        arguments.defaults = arguments.defaults[1:]
    if arguments.posonlyargs:
        arguments.posonlyargs = arguments.posonlyargs[1:]
    else:
        arguments.args = arguments.args[1:]
    return arguments


def _reindented(lines: list[str], indent: str) -> list[str]:
    """``lines`` moved from ``indent`` to INDENT; lines that start less deep (inside a string, say) are left as they
    are, and the parse check then decides whether the result still means the same."""
    return [
        INDENT + line[len(indent) :] if line.startswith(indent) else "" if not line.strip() else line for line in lines
    ]


def _column(line: str, byte_offset: int) -> int:
    """The character index of a byte offset of ``ast`` (offsets count UTF-8 bytes)."""
    return len(line.encode()[:byte_offset].decode(errors="replace"))


class _FileExtractor:
    """The functions of one parsed module as pairs, and the counts of those left out."""

    def __init__(self, source: str, module: ast.Module, self_contained: bool) -> None:
        self.lines = source.split("\n")
        self.self_contained = self_contained
        self.imports = _module_imports(module)
        self.importable = {name for statement in self.imports for name, _ in _bound_names(statement)}
        self.functions: list[ExtractedFunction] = []
        self.dropped: Counter[str] = Counter()
        self.found = 0
        self._visit(module.body, in_class=False)

    def _visit(self, statements: list[ast.stmt], in_class: bool) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.found += 1
                self._count_nested(node)
                reason = self._extract(node, in_class)
                if reason is not None:
                    self.dropped[reason] += 1
            elif isinstance(node, ast.ClassDef):
                self._visit(node.body, in_class=True)
            else:  # module-level blocks (if/try/with/for...) define functions at module level too
                for field in ("body", "orelse", "finalbody"):
                    self._visit(getattr(node, field, None) or [], in_class)
                for handler in getattr(node, "handlers", []):
                    self._visit(handler.body, in_class)

    def _count_nested(self, function: ast.AST) -> None:
        nested = [
            node
            for node in ast.walk(ast.Module(function.body, []))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        self.found += len(nested)
        self.dropped["nested"] += len(nested)

    def _extract(self, node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> str | None:
        """The pair of ``node`` added to ``self.functions``, or the reason it is left out."""
        if isinstance(node, ast.AsyncFunctionDef):
            return "async"
        arguments = node.args
        if in_class and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list):
            first = (node.args.posonlyargs + node.args.args)[:1]
            if not first or _uses_name(node, first[0].arg):
                return "method_uses_instance"
            arguments = _drop_first_parameter(node.args)
        docstring = _docstring(node)
        if docstring is None:
            return "no_docstring"
        header = copy.copy(node)
        header.decorator_list, header.body, header.args = [], [ast.Pass()], arguments
        signature = ast.unparse(header).rsplit("\n", 1)[0]
        rendered = self._render_docstring_and_body(node)
        if rendered is None:
            return "not_reindentable"
        docstring_lines, body_lines = rendered
        function_source = "\n".join([signature, *docstring_lines, *body_lines]) + "\n"
        statements = _without_docstring(node)
        if not self._same_function(function_source, statements, docstring):
            return "not_reindentable"
        used = _global_names(function_source, node.name)
        unresolved = used - BUILTIN_NAMES - self.importable
        if self.self_contained and unresolved:
            return "unresolved_names"
        imports = self._imports_for(used)
        self.functions.append(
            ExtractedFunction(
                name=node.name,
                prompt=(imports + "\n\n\n" if imports else "") + "\n".join([signature, *docstring_lines]) + "\n",
                completion="\n".join(body_lines) + "\n" if body_lines else "",
                docstring=docstring,
                body_key=body_key(statements),
                body_tokens=body_tokens(statements),
            )
        )
        return None

    def _render_docstring_and_body(self, node: ast.FunctionDef) -> tuple[list[str], list[str]] | None:
        """The docstring's and the body's source lines at INDENT, or None when the docstring does not stand on lines
        of its own."""
        docstring = node.body[0]
        first, last = self.lines[docstring.lineno - 1], self.lines[docstring.end_lineno - 1]
        indent = first[: _column(first, docstring.col_offset)]
        tail = last[_column(last, docstring.end_col_offset) :].strip()
        if indent.strip() or (tail and not tail.startswith("#")):
            return None
        docstring_lines = _reindented(self.lines[docstring.lineno - 1 : docstring.end_lineno], indent)
        body = _reindented(self.lines[docstring.end_lineno : node.end_lineno], indent)
        while body and not body[0].strip():
            body.pop(0)
        return docstring_lines, body

    @staticmethod
    def _same_function(function_source: str, statements: list[ast.stmt], docstring: str) -> bool:
        try:
            (rendered,) = ast.parse(function_source).body
        except SyntaxError:
            return False
        return _docstring(rendered) == docstring and body_key(_without_docstring(rendered)) == body_key(statements)

    def _imports_for(self, names: set[str]) -> str:
        """The module's import statements that bind ``names``, cut down to those names, in the module's order."""
        kept = []
        for statement in self.imports:
            bound = [(name, alias) for name, alias in _bound_names(statement) if name in names]
            if bound:
                names = names - {name for name, _ in bound}  # a name bound twice is imported once, the first time
                aliases = [alias for _, alias in bound]
                kept.append(ast.unparse(type(statement)(**{**statement.__dict__, "names": aliases})))
        return "\n".join(kept)


def extract_functions(source: str, self_contained: bool = True) -> tuple[list[ExtractedFunction], Counter[str]]:
    """The functions of one module's ``source`` as HumanEval-shaped pairs (see the module docstring), and the number
    left out for each reason, with ``"functions"`` the number found.

    Raises ``SyntaxError`` (or ``ValueError``, ``RecursionError``) for source that does not parse.

    Example::

        functions, dropped = extract_functions(Path("module.py").read_text())
        print(functions[0].prompt + functions[0].completion)
    """
    # ast counts lines at \n, \r\n and \r only (str.splitlines also splits at form feeds and others)
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    with warnings.catch_warnings():  # invalid escape sequences in old code warn at parse time
        warnings.simplefilter("ignore")
        module = ast.parse(source)
    extractor = _FileExtractor(source, module, self_contained)
    return extractor.functions, Counter({"functions": extractor.found, **extractor.dropped})


class HumanEvalIndex:
    """What decontamination compares against: HumanEval's function names and canonical solutions.

    A function is contaminated when
    - its name is the name of a function defined in a HumanEval prompt (the entry points and the helpers some prompts
      define, such as ``is_palindrome``), or
    - its normalised body (``ast.dump``, so layout and comments do not count) equals a canonical solution's, or
    - its body contains at least half of the distinct 10-grams of a canonical solution's tokens (tokens of the body as
      ``ast.unparse`` writes it, names and literals kept). Ten tokens are about one line of code (``for idx, elem in
      enumerate(numbers):`` is 11), so a shared idiom is not enough; half of a solution is a copy with edits.
    """

    def __init__(self, problems: Sequence[Mapping]) -> None:
        self.names: set[str] = set()
        self.bodies: dict[str, str] = {}
        self.ngrams: dict[tuple[str, ...], set[str]] = {}
        self.ngram_counts: dict[str, int] = {}
        for problem in problems:
            module = ast.parse(problem["prompt"] + problem["canonical_solution"])
            functions = {node.name: node for node in ast.walk(module) if isinstance(node, ast.FunctionDef)}
            self.names |= set(functions)
            statements = _without_docstring(functions[problem["entry_point"]])
            self.bodies[body_key(statements)] = problem["task_id"]
            grams = set(ngrams(body_tokens(statements), NGRAM))
            self.ngram_counts[problem["task_id"]] = len(grams)
            for gram in grams:
                self.ngrams.setdefault(gram, set()).add(problem["task_id"])

    def contamination(self, function: ExtractedFunction) -> str | None:
        """The drop reason (``humaneval_name``, ``humaneval_body``, ``humaneval_ngram``), or None when clean."""
        if function.name in self.names:
            return "humaneval_name"
        if function.body_key in self.bodies:
            return "humaneval_body"
        shared: Counter[str] = Counter()
        for gram in set(ngrams(function.body_tokens, NGRAM)):
            shared.update(self.ngrams.get(gram, ()))
        if any(count >= NGRAM_CONTAINMENT * self.ngram_counts[task] for task, count in shared.items()):
            return "humaneval_ngram"
        return None


def ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def function_pairs(
    files: Iterable[Mapping[str, str]],
    heldout_percent: int = 5,
    min_docstring_chars: int = 32,
    min_body_lines: int = 2,
    max_body_lines: int = 40,
    self_contained: bool = True,
    problems: Sequence[Mapping] | None = None,
) -> tuple[DatasetDict, dict[str, int]]:
    """HumanEval-shaped prompt/completion pairs from the functions of ``files``, split by file, and their statistics.

    Args:
        files: Rows with ``"path"`` (relative, the key of the hash split) and ``"text"`` (the source), such as the
            rows of `python_stdlib_corpus` or `python_packages_corpus` splits chained together. Test files
            (`is_test_file`) and files that do not parse are skipped.
        heldout_percent: Files with ``is_heldout(path, heldout_percent)`` give the ``test`` split, the rest ``train``.
            With the corpora's own default (5) the held-out files are exactly those of the corpora's ``test`` splits.
        min_docstring_chars: Shortest docstring kept (characters, after ``inspect.cleandoc``).
        min_body_lines, max_body_lines: Shortest and longest body kept (non-blank lines of the completion).
        self_contained: Keep only functions whose global names are builtins or imported (see the module docstring).
        problems: HumanEval problems to decontaminate against; default: all 164 (`humaneval.load_problems`).

    Returns:
        A ``DatasetDict`` with ``train`` and ``test`` splits (columns ``prompt``, ``completion``, ``name``, ``path``;
        TRL's prompt-completion format, so ``SFTTrainer`` trains on the completions only), and the statistics:
        ``files``, ``test_files``, ``unparsable_files``, ``functions`` (found), one count per drop reason
        (`DROP_REASONS`, each function counted under the first that applies), and the ``train``/``test`` pairs kept.
        ``functions`` is the sum of the drop counts and the pairs kept.

    Example::

        pairs, stats = function_pairs(chain(*python_stdlib_corpus().values()))
        trainer = SFTTrainer(..., train_dataset=pairs["train"].select_columns(["prompt", "completion"]))
    """
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be between 1 and 99, got {heldout_percent}")
    if problems is None:
        from .humaneval import load_problems

        problems = load_problems()
    index = HumanEvalIndex(problems)
    stats: Counter[str] = Counter({key: 0 for key in ("files", "test_files", "unparsable_files", "functions")})
    stats.update({reason: 0 for reason in DROP_REASONS})
    splits: dict[str, dict[str, list[str]]] = {name: {key: [] for key in PAIR_FEATURES} for name in ("train", "test")}
    seen_bodies: set[str] = set()
    for row in files:
        stats["files"] += 1
        if is_test_file(row["path"]):
            stats["test_files"] += 1
            continue
        try:
            functions, dropped = extract_functions(row["text"], self_contained)
        except (SyntaxError, ValueError, RecursionError):
            stats["unparsable_files"] += 1
            continue
        stats.update(dropped)
        split = splits["test" if is_heldout(row["path"], heldout_percent) else "train"]
        for function in functions:
            body_lines = sum(1 for line in function.completion.splitlines() if line.strip())
            reason = (
                "short_docstring"
                if len(function.docstring) < min_docstring_chars
                else "short_body"
                if body_lines < min_body_lines
                else "long_body"
                if body_lines > max_body_lines
                else index.contamination(function) or ("duplicate" if function.body_key in seen_bodies else None)
            )
            if reason is not None:
                stats[reason] += 1
                continue
            seen_bodies.add(function.body_key)
            for key, value in (("prompt", function.prompt), ("completion", function.completion)):
                split[key].append(value)
            split["name"].append(function.name)
            split["path"].append(row["path"])
    pairs = DatasetDict({name: Dataset.from_dict(columns, features=PAIR_FEATURES) for name, columns in splits.items()})
    stats.update({name: len(split) for name, split in pairs.items()})
    return pairs, dict(stats)


def as_conversations(pairs: Dataset, instruction: str | None = None) -> Dataset:
    """The pairs in TRL's conversational prompt-completion format, for chat-mode training.

    The user turn is the prompt inside ``instruction`` (default: the one `humaneval.evaluate_humaneval` uses in chat
    mode, so training and evaluation ask the same way); the assistant turn is the complete function in a fenced
    ``python`` block, the answer that chat-mode evaluation reads. ``SFTTrainer`` applies the tokenizer's chat template
    and trains on the assistant turn only (TRL 1.x: ``prompt`` and ``completion`` are lists of messages).

    Example::

        trainer = SFTTrainer(model, train_dataset=as_conversations(pairs["train"]), processing_class=tokenizer)
    """
    if instruction is None:
        from .humaneval import CHAT_INSTRUCTION

        instruction = CHAT_INSTRUCTION

    def conversation(row: dict) -> dict:
        return {
            "prompt": [{"role": "user", "content": instruction.format(prompt=row["prompt"])}],
            "completion": [{"role": "assistant", "content": f"```python\n{row['prompt']}{row['completion']}```"}],
        }

    return pairs.map(conversation, remove_columns=pairs.column_names)

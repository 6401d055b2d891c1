"""YAML text -> nodes -> values, every problem located: the one place PyYAML's errors are translated.

The parser reads the manifest as a node graph rather than as Python objects, so that it knows the line of
every value and the raw text of every scalar. :class:`Nodes` composes the text, reads a mapping's entries
(merge keys applied, a key written twice refused) and builds JSON values for models other than
flux-kontext-max, measuring them on the graph with a memo so that aliases (billion laughs) stay linear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from batchrunner.errors import ManifestError
from batchrunner.manifest.values import Invalid, describe, misread, scalar_size, show

MAX_MANIFEST_BYTES = 10 * 1024 * 1024
# Aliases let a few lines stand for a huge value (billion laughs). Sizes are measured on the node graph with
# a memo, so measuring is linear in the file; these bounds keep the JSON we then build and hash finite.
_MAX_VALUE_CHARS = 1_000_000
_MAX_DEPTH = 50

TAG_STR = "tag:yaml.org,2002:str"
TAG_SEQ = "tag:yaml.org,2002:seq"
TAG_MAP = "tag:yaml.org,2002:map"
TAG_MERGE = "tag:yaml.org,2002:merge"

# libyaml is some 10x faster on big generated manifests; both produce the same nodes and marks.
Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Nodes:
    """One manifest's text as YAML nodes: the file name for errors, the constructor, the memo of JSON values."""

    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.path = path
        self.constructor = SafeConstructor()
        self.memo: dict[int, tuple[Any, int]] = {}
        self.active: set[int] = set()

    def fail(
        self, message: str, *, job: str | None = None, field: str | None = None, node: Node | None = None
    ) -> NoReturn:
        raise ManifestError(message, file=self.path, job=job, field=field, line=line_of(node))

    def compose(self) -> MappingNode:
        if len(self.text) > MAX_MANIFEST_BYTES:
            self.fail(f"is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MB")
        loader = None
        try:
            loader = Loader(self.text)
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            self.fail_yaml(exc)
        except yaml.reader.ReaderError as exc:
            char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
            line = self.text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
            raise ManifestError(
                f"invalid YAML: unacceptable character {char}: {exc.reason}", file=self.path, line=line
            ) from None
        except UnicodeError:
            self.fail("the text contains a character that is not valid Unicode (a lone surrogate)")
        except yaml.YAMLError as exc:
            self.fail(f"invalid YAML: {one_line(str(exc))}")
        finally:
            if loader is not None:
                loader.dispose()
        if root is None:
            self.fail("the manifest is empty")
        if not (isinstance(root, MappingNode) and root.tag == TAG_MAP):
            self.fail(
                f"the manifest must be a mapping with keys such as model, defaults, matrix, jobs; "
                f"got {self.kind(root)}",
                node=root,
            )
        return root

    def fail_yaml(self, exc: yaml.MarkedYAMLError) -> NoReturn:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = one_line(exc.problem or "") or one_line(exc.context or "") or "cannot be parsed"
        if mark is not None and self.tab_at(mark.line, mark.column):
            problem = "a tab character is used for indentation; YAML needs spaces"
        elif exc.context and exc.problem:
            context = one_line(exc.context)
            # libyaml splits some messages as "expected X" / "but found Y": they read as one sentence.
            problem = f"{context}, {problem}" if problem.startswith("but ") else f"{problem} ({context})"
        raise ManifestError(f"invalid YAML: {problem}", file=self.path, line=line) from None

    def tab_at(self, line: int, column: int) -> bool:
        lines = self.text.splitlines()
        if not 0 <= line < len(lines):
            return False
        text = lines[line]
        indent = text[: len(text) - len(text.lstrip(" \t"))]
        return "\t" in indent or text[column : column + 1] == "\t"

    def pairs(self, node: MappingNode, *, job: str | None) -> dict[str, tuple[Node, Node]]:
        """The mapping's entries by key, merge keys (``<<``) applied; a key written twice is an error."""
        seen: dict[Any, int | None] = {}
        for key_node, _ in node.value:
            if key_node.tag == TAG_MERGE:
                continue
            key = self.key(key_node, job)
            if key in seen:
                first = seen[key]
                self.fail(
                    f"is written twice in the same mapping (first on line {first})",
                    job=job,
                    field=key,
                    node=key_node,
                )
            seen[key] = line_of(key_node)
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            self.fail_yaml(exc)
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            out[self.key(key_node, job)] = (key_node, value_node)
        return out

    def key(self, node: Node, job: str | None) -> str:
        if isinstance(node, ScalarNode) and node.tag == TAG_STR:
            return str(node.value)
        shown = f"{node.value!r}" if isinstance(node, ScalarNode) else self.kind(node)
        self.fail(f"keys must be strings, got {shown}; quote it", job=job, node=node)

    def scalar(self, node: ScalarNode, *, job: str | None, field: str | None) -> Any:
        if node.tag == TAG_STR:
            return node.value  # the common case, without the constructor's bookkeeping
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            self.fail(
                f"cannot read the value: {one_line(str(exc).split(chr(10))[0])}",
                job=job,
                field=field,
                node=node,
            )

    def json_value(self, node: Node, *, job: str | None, field: str, depth: int) -> tuple[Any, int]:
        """A JSON value from a node, with its expanded size in JSON characters; linear even with aliases."""
        key = id(node)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if key in self.active:
            raise Invalid("refers to itself through a YAML alias")
        if depth > _MAX_DEPTH:
            raise Invalid(f"is nested more than {_MAX_DEPTH} levels deep")
        value: Any
        if isinstance(node, ScalarNode):
            value = self.scalar(node, job=job, field=field)
            why = misread(node, value)
            if why is not None:
                raise Invalid(f"{why}; quote it to send it as text")
            size = scalar_size(value)
        elif isinstance(node, SequenceNode) and node.tag == TAG_SEQ:
            self.active.add(key)
            items = [self.json_value(child, job=job, field=field, depth=depth + 1) for child in node.value]
            self.active.discard(key)
            value = [item for item, _ in items]
            size = 2 + len(items) + sum(s for _, s in items)
        elif isinstance(node, MappingNode) and node.tag == TAG_MAP:
            self.active.add(key)
            entries = {
                name: self.json_value(child, job=job, field=field, depth=depth + 1)
                for name, (_, child) in self.pairs(node, job=job).items()
            }
            self.active.discard(key)
            value = {name: item for name, (item, _) in entries.items()}
            size = 2 + sum(len(name) + 4 + s for name, (_, s) in entries.items())
        else:
            raise Invalid(f"uses the YAML tag {node.tag!r}, which has no JSON equivalent")
        if size > _MAX_VALUE_CHARS:
            raise Invalid(f"is too large: about {size:,} characters of JSON, more than {_MAX_VALUE_CHARS:,}")
        self.memo[key] = (value, size)
        return value, size

    def kind(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError):
            return show(str(node.value))
        return describe(value)


def line_of(node: Node | None) -> int | None:
    """The 1-based line a node starts on, or None."""
    if node is None or node.start_mark is None:
        return None
    return int(node.start_mark.line) + 1


def one_line(text: str) -> str:
    return " ".join(text.split())

"""Translate a Hugging Face Jinja chat template into an Ollama Go template (messages mode).

The translator walks jinja2's own AST (``Environment.parse``) with a small partial evaluator: values known at
translation time (special tokens, literals, ``add_generation_prompt``, undefined optional variables) are folded
in Python; values that depend on the conversation become Go pipelines over Ollama's data model
(``$.Messages``, ``$.Tools``, ``.ToolCalls`` ...), tagged with a *kind* that says which Ollama type they hold.
Jinja variables whose value changes inside runtime branches or loops become Go variables (``$x := ...`` at the
start of their Jinja scope, ``$x = ...`` where Jinja assigns them); the translator discovers them by
translating once, noticing the change, and translating again.

Assumptions that come from Ollama's data model, not from the template (each is recorded in ``notes``):
message content is a plain string without thinking delimiters (``<think>``, Gemma 4's channel markers: Ollama
separates thinking into ``.Thinking``), content has no leading/trailing whitespace (``trim`` on content is the
identity), tool-call arguments are objects. Anything else Go cannot express raises :class:`Unsupported` naming the construct and its line; the
caller then falls back to a named family template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.nodes as nodes

from ..errors import LlmforgeError
from .jinja_render import compile_template, make_environment, parse_template, unknown_name_error
from .ollama_choice import has_tool_round_trip


class Unsupported(Exception):
    """A construct with no faithful Go equivalent."""

    def __init__(self, construct: str, lineno: int | None):
        self.construct = construct
        self.lineno = lineno
        super().__init__(f"{construct} (line {lineno})")


class _Restart(Exception):
    """A Jinja variable must become a Go variable; translate again."""


class _Undefined:
    def __repr__(self) -> str:
        return "Undefined"

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return ""


UNDEFINED = _Undefined()
# Thinking delimiters that content never holds in Ollama (its parsers move thinking into .Thinking):
# DeepSeek/Qwen style and Gemma 4's channel markers.
THINK_TAGS = ("<think>", "</think>", "<|channel>", "<channel|>")


# ---------------------------------------------------------------- values

@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Rt:
    """A runtime value: a Go pipeline (``expr``) of a known kind; ``parts`` for strings built by concatenation."""

    expr: str
    kind: str
    parts: tuple = ()          # for kind "str": tuple of str (literal) | Rt (runtime) pieces
    defined: str | None = None  # Go truth expression for `is defined`, when not always defined
    markup: bool = False       # a Jinja Markup string: what is added to it gets HTML-escaped


@dataclass
class Namespace:
    attrs: dict[str, Any]
    go_prefix: str


@dataclass
class LoopInfo:
    index_var: str
    list_var: str
    filtered: bool


@dataclass(frozen=True)
class Macro:
    node: nodes.Macro


# Attribute tables: kind -> attribute -> (Go field, kind of the result). A missing attribute is undefined.
ATTRS: dict[str, dict[str, tuple[str, str]]] = {
    "message": {"role": ("Role", "str"), "content": ("Content", "str"), "tool_calls": ("ToolCalls", "toolcalls"),
                "reasoning_content": ("Thinking", "str"), "thinking": ("Thinking", "str"),
                "reasoning": ("Thinking", "str"),
                "name": ("ToolName", "str"), "tool_call_id": ("ToolCallID", "str")},
    "toolcall": {"id": ("ID", "str"), "function": ("Function", "tcfunction")},
    "tcfunction": {"name": ("Name", "str"), "arguments": ("Arguments", "arguments")},
    "tool": {"type": ("Type", "str"), "function": ("Function", "toolfunction")},
    "toolfunction": {"name": ("Name", "str"), "description": ("Description", "str"),
                     "parameters": ("Parameters", "parameters")},
    "parameters": {"type": ("Type", "str"), "required": ("Required", "strlist"),
                   "properties": ("Properties", "properties")},
    "property": {"type": ("Type", "str"), "description": ("Description", "str"), "enum": ("Enum", "list")},
}
# Attributes that are always present (the rest are "defined" only when non-empty, as in Ollama's JSON).
ALWAYS_DEFINED = {("message", "role"), ("message", "content"), ("toolcall", "function"),
                  ("tcfunction", "name"), ("tcfunction", "arguments"), ("tool", "type"), ("tool", "function"),
                  ("toolfunction", "name"), ("toolfunction", "parameters"), ("parameters", "type"),
                  ("parameters", "properties")}
CONST_ATTRS = {("toolcall", "type"): "function"}
ELEMENT_KIND = {"messages": "message", "toolcalls": "toolcall", "tools": "tool", "strlist": "str", "list": "any",
                "any": "any"}
JSON_KINDS = {"tools", "tool", "toolfunction", "parameters", "properties", "property", "arguments", "toolcalls",
              "toolcall", "tcfunction", "strlist", "str", "int", "bool", "list", "any", "messages", "message"}


@lru_cache(maxsize=1)
def known_names() -> tuple[frozenset[str], frozenset[str]]:
    """The filters and tests of transformers' Jinja environment."""
    env = make_environment()
    return frozenset(env.filters), frozenset(env.tests)


def uses_loop(body: list[nodes.Node]) -> bool:
    """Whether statements refer to their own for loop's `loop` (nested for loops have their own)."""
    for node in body:
        if isinstance(node, nodes.Name) and node.name == "loop":
            return True
        if isinstance(node, nodes.For):
            if uses_loop([node.iter] + ([node.test] if node.test is not None else [])):
                return True
            continue
        if uses_loop(list(node.iter_child_nodes())):
            return True
    return False


def go_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def jinja_str(value: Any) -> str:
    """How Jinja prints a Python value."""
    if value is None:
        return "None"
    if value is UNDEFINED:
        return ""
    return str(value)


def str_parts(value: Any) -> tuple:
    if isinstance(value, Const):
        return (jinja_str(value.value),)
    if value.kind == "str" and value.parts:
        return value.parts
    return (value,)


def make_str(parts: tuple) -> Const | Rt:
    merged: list = []
    for part in parts:
        if isinstance(part, str):
            if part == "":
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += part
                continue
        merged.append(part)
    if all(isinstance(p, str) for p in merged):
        return Const("".join(merged))
    if len(merged) == 1:
        return merged[0]
    fmt = "".join("%s" if isinstance(p, str) or p.kind == "str" else "%v" for p in merged)
    args = " ".join(go_string(p) if isinstance(p, str) else wrap(p.expr) for p in merged)
    return Rt(f"printf {go_string(fmt)} {args}", "str", tuple(merged))


def wrap(expr: str) -> str:
    """Parenthesise a Go pipeline used as an argument."""
    simple = expr.startswith("$") or expr.startswith(".") or expr.startswith('"')
    return expr if simple and " " not in expr else f"({expr})"


def go_literal(value: Any, lineno: int | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return go_string(value)
    if isinstance(value, int):
        return str(value)
    if value is None or value is UNDEFINED:
        return '""'
    if value == [] or value == ():
        return "(slice $.Messages 0 0)"  # an empty list: no items, length 0, false
    raise Unsupported(f"a constant {type(value).__name__} used at run time", lineno)


def as_go(value: Const | Rt, lineno: int | None) -> str:
    return value.expr if isinstance(value, Rt) else go_literal(value.value, lineno)


def int_plus(a: str, b: str) -> str:
    """a + b for non-negative ints: Go templates have no arithmetic, but printf pads to a width."""
    return f'len (printf "%*s%*s" {wrap(a)} "" {wrap(b)} "")'


def int_minus(a: str, b: str) -> str:
    """a - b for a >= b >= 0."""
    return f'len (slice (printf "%*s" {wrap(a)} "") {wrap(b)})'


# ---------------------------------------------------------------- translator

@dataclass
class Translation:
    """Result of translating a chat template."""

    go_template: str
    fallback: str | None = None            # named template used instead, when the Jinja is not translatable
    problems: list[str] = field(default_factory=list)  # untranslatable constructs with their lines
    notes: list[str] = field(default_factory=list)     # assumptions made (Ollama data model)
    default_system: str | None = None


@dataclass
class _Scope:
    env: dict[str, Any]


class _Translator:
    def __init__(self, special_tokens: dict[str, str], forced: dict[str, str], bos_loops: set[int],
                 spell_tool_role: bool = False):
        self.tokens = special_tokens
        self.spell_tool_role = spell_tool_role  # print roles through `eq .Role "tool"` (see spelled_role)
        self.source = ""              # the Jinja text, for error columns
        self.forced = forced          # jinja variable key -> kind, variables that must be Go variables
        self.bos_loops = bos_loops    # linenos of loops that need a "nothing printed yet" flag
        self.out: list[str] = []
        self.env: dict[str, Any] = {}
        self.notes: set[str] = set()
        self.counter = 0
        self.loops: list[LoopInfo] = []
        self.printed = "no"           # has anything been printed: "no" | "yes" | "maybe"
        self.fresh_var: str | None = None
        self.macros_active: list[str] = []
        self.runtime_depth = 0        # >0 inside a runtime if-branch
        self.capture_vars: list[str] = []  # Go variables collecting output ({% set %} blocks, macro values)
        self.list_kind: dict[str, str] = {}  # Go list variable -> kind, for loop.previtem/nextitem
        self.def_vars: set[str] = set()
        self.defines: dict[tuple, str] = {}   # specialised recursive macro -> Go template name
        self.define_jobs: list[tuple] = []
        self.globals_env: dict[str, Any] = {}  # Go variables with a companion "$def_<name>" (may be undefined)

    # ------------------------------------------------------------ helpers
    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"${stem}{self.counter}"

    def emit(self, text: str) -> None:
        self.out.append(text)

    def emit_text(self, text: str) -> None:
        if not text:
            return
        if self.capture_vars:
            self.emit_print(go_string(text), "%s")
            return
        if "{{" in text or text.endswith("{"):
            self.emit("{{ " + go_string(text) + " }}")
        else:
            self.emit(text)
        self.mark_printed("yes")

    def emit_print(self, expr: str, verb: str = "%v") -> None:
        """Print a pipeline's value; inside a capture, append it to the capturing Go variable instead."""
        if self.capture_vars:
            cap = self.capture_vars[-1]
            self.emit("{{ " + f'{cap} = printf "%s{verb}" {cap} {wrap(expr)}' + " }}")
            return
        self.emit("{{ " + expr + " }}")

    def mark_printed(self, how: str) -> None:
        if self.fresh_var and self.printed != "yes":
            self.emit("{{ " + self.fresh_var + " = false }}")
        if how == "yes" or self.printed == "yes":
            self.printed = "yes"
        else:
            self.printed = "maybe"

    def var_key(self, name: str) -> str:
        return name

    # ------------------------------------------------------------ entry
    def translate(self, tree: nodes.Template) -> str:
        self.env = {}
        self.globals_env = self.env
        self.declare_forced(tree.body, self.env, top=True)
        self.stmts(tree.body)
        self.emit_defines()
        text = "".join(self.out)
        if ".Messages" not in text:
            # Ollama picks messages mode only when the template mentions .Messages (legacy mode loses turns)
            text = "{{- if false }}{{ .Messages }}{{ end }}" + text
        return text

    def declare_forced(self, body: list[nodes.Node], env: dict[str, Any], top: bool = False,
                       shadow: bool = False) -> None:
        """Declare, at the start of a Jinja scope, the Go variables for names assigned in it. In a loop body
        (`shadow`, a Go range scope) a variable is declared again even when it already is one: Jinja starts
        every iteration from the outer value and never lets the loop's assignments out."""
        for name in sorted(self.assigned_names(body)):
            if name in self.forced:
                init = env.get(name)
                if not isinstance(init, (Const, Rt)):
                    init = self.name_value(name, None)
                expr = as_go(init, None) if isinstance(init, (Const, Rt)) else '""'
                go = "$" + name
                if isinstance(init, Rt) and init.expr == go and not shadow:
                    continue
                self.emit("{{ " + f"{go} := {expr}" + " }}")
                defined = None
                if isinstance(init, Const) and (init.value is UNDEFINED or init.value is None):
                    defined = f"$def_{name}"
                    self.emit("{{ " + f"{defined} := false" + " }}")
                    self.def_vars.add(name)
                elif isinstance(init, Rt) and init.defined:
                    defined = f"$def_{name}"
                    self.emit("{{ " + f"{defined} := {init.defined}" + " }}")
                    self.def_vars.add(name)
                env[name] = self.forced_value(name, defined)
                if isinstance(init, Rt) and init.kind in ATTRS and init.kind != self.forced[name]:
                    env[name] = Rt(go, init.kind, defined=defined)  # holds init's type until reassigned

    def forced_value(self, name: str, defined: str | None) -> Rt:
        """A Jinja variable held in a Go variable. A string split on a literal ("split:SEP") is held as the
        string itself, split again wherever it is used."""
        go, kind = "$" + name, self.forced[name]
        if kind.startswith("split:"):
            return Rt(go, "splitlist", (Rt(go, "str"), kind[len("split:"):]), defined=defined)
        return Rt(go, kind, defined=defined)

    @staticmethod
    def builtin_names() -> set[str]:
        return {"messages", "tools"}

    def assigned_names(self, body: list[nodes.Node]) -> set[str]:
        names: set[str] = set()

        def walk(node: nodes.Node) -> None:
            if isinstance(node, (nodes.Assign, nodes.AssignBlock)) and isinstance(node.target, nodes.Name):
                names.add(node.target.name)
            if isinstance(node, (nodes.For, nodes.Macro)):
                return
            for child in node.iter_child_nodes():
                if isinstance(child, (nodes.Stmt, nodes.Helper)) or isinstance(child, nodes.Template):
                    walk(child)

        for stmt in body:
            walk(stmt)
        return names

    # ------------------------------------------------------------ statements
    def stmts(self, body: list[nodes.Node]) -> None:
        for node in body:
            self.stmt(node)

    def stmt(self, node: nodes.Node) -> None:
        handler = getattr(self, f"stmt_{type(node).__name__}", None)
        if handler is None:
            raise Unsupported(f"statement {type(node).__name__}", node.lineno)
        handler(node)

    def stmt_Output(self, node: nodes.Output) -> None:
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                self.emit_text(child.data)
            else:
                self.output_expr(child)

    def output_expr(self, expr: nodes.Expr) -> None:
        if isinstance(expr, nodes.Call) and isinstance(expr.node, nodes.Name):
            name = expr.node.name
            if name == "raise_exception":
                self.notes.add("raise_exception is dropped (Go templates cannot raise)")
                return
            macro = self.env.get(name)
            if isinstance(macro, Macro):
                self.inline_macro(macro, expr)
                return
        if self.output_trimmed_macro(expr):
            return
        if isinstance(expr, nodes.CondExpr):
            test = self.truth(self.eval(expr.test), expr.lineno)
            if isinstance(test, Const):
                if test.value:
                    self.output_expr(expr.expr1)
                elif expr.expr2 is not None:
                    self.output_expr(expr.expr2)
                return
            self.emit("{{ if " + test.expr + " }}")
            before = self.printed
            self.output_expr(expr.expr1)
            if expr.expr2 is not None:
                self.emit("{{ else }}")
                self.output_expr(expr.expr2)
            self.emit("{{ end }}")
            self.printed = "yes" if before == "yes" else "maybe"
            return
        if isinstance(expr, (nodes.Concat, nodes.Add)) and self.is_string_concat(expr):
            for part in (expr.nodes if isinstance(expr, nodes.Concat) else [expr.left, expr.right]):
                self.output_expr(part)
            return
        if isinstance(expr, nodes.Name) and expr.name == "bos_token" and "bos_token" in self.tokens \
                and "bos_token" not in self.env:
            self.output_bos()
            return
        value = self.eval(expr)
        self.output_value(value, expr.lineno)

    def output_trimmed_macro(self, expr: nodes.Expr) -> bool:
        """`{{ macro(...) | trim }}` prints the macro in place when its output always starts and ends with
        non-space literal text: trim is then the identity, and the macro need not be captured (a Go template
        call, which recursion needs, cannot be captured)."""
        if not (isinstance(expr, nodes.Filter) and expr.name == "trim" and not expr.args and not expr.kwargs
                and isinstance(expr.node, nodes.Call) and isinstance(expr.node.node, nodes.Name)
                and isinstance(self.env.get(expr.node.node.name), Macro) and not self.capture_vars):
            return False
        saved_out, saved_printed, saved_env = self.out, self.printed, self.env
        saved_active, saved_jobs, saved_defines = list(self.macros_active), list(self.define_jobs), dict(self.defines)
        self.out = []
        try:
            self.inline_macro(self.env[expr.node.node.name], expr.node)
            pieces = [p for p in self.out if p]
        except Unsupported:
            pieces = []
        finally:
            body, self.out = self.out, saved_out
        literal = [p for p in (pieces[:1] + pieces[-1:]) if not p.startswith("{{")]
        if len(pieces) < 2 or len(literal) < 2 or pieces[0][0].isspace() or pieces[-1][-1].isspace():
            self.printed, self.env, self.macros_active = saved_printed, saved_env, saved_active
            self.define_jobs, self.defines = saved_jobs, saved_defines
            return False
        self.out.extend(body)
        return True

    def is_string_concat(self, expr: nodes.Expr) -> bool:
        if isinstance(expr, nodes.Concat):
            return True
        if any(isinstance(c.node, nodes.Name) and isinstance(self.env.get(c.node.name), Macro)
               for c in (expr.left, expr.right) if isinstance(c, nodes.Call)):
            return True  # print a macro's output in place (it may recurse) rather than capture it
        saved_out = list(self.out)
        try:
            value = self.eval(expr)
        except Unsupported:
            return False
        finally:
            self.out[:] = saved_out  # a probe: drop any preludes it emitted
        if self.is_markup(value):
            return False  # Markup concatenation escapes; print the combined value instead
        return isinstance(value, Const) and isinstance(value.value, str) or \
            isinstance(value, Rt) and value.kind == "str"

    def output_bos(self) -> None:
        bos = self.tokens["bos_token"]
        if self.printed == "no":
            self.notes.add("a leading BOS is left to llama.cpp (it adds BOS when tokenizing)")
            return
        if self.printed == "maybe":
            if self.fresh_var:
                text = bos if "{{" not in bos else "{{ " + go_string(bos) + " }}"
                self.emit("{{ if not " + self.fresh_var + " }}" + text + "{{ end }}{{ " + self.fresh_var
                          + " = false }}")
                self.printed = "yes"
                return
                self.mark_printed("yes")
                return
            loop_line = self.loops[-1].index_var if self.loops else None
            if loop_line is not None and self.current_loop_line is not None:
                self.bos_loops.add(self.current_loop_line)
                raise _Restart
        self.emit_text(bos)

    current_loop_line: int | None = None

    def output_value(self, value: Const | Rt, lineno: int | None) -> None:
        if isinstance(value, Const):
            if value.value is UNDEFINED or value.value == "":
                return
            if isinstance(value.value, (list, dict)):
                raise Unsupported("printing a list or dict", lineno)
            self.emit_text(jinja_str(value.value))
            return
        if value.kind == "str":
            for part in str_parts(value):
                if isinstance(part, str):
                    self.emit_text(part)
                else:
                    self.emit_print(self.spelled_role(part) if self.spell_tool_role else part.expr)
                    self.mark_printed("maybe")
            return
        if value.kind == "int":
            self.emit_print(value.expr)
            self.mark_printed("yes")
            return
        if value.kind == "bool":
            self.emit_print(f'or (and {wrap(value.expr)} "True") "False"')
            self.mark_printed("yes")
            return
        if value.kind == "any":
            self.notes.add("values of mixed type are printed with Go's formatting")
            self.emit_print(value.expr)
            self.mark_printed("maybe")
            return
        if value.kind in ("arguments", "tcfunction", "tool", "toolfunction", "parameters", "properties"):
            self.notes.add("a mapping printed directly is written as JSON (Jinja prints a Python repr)")
            self.emit_print("json " + wrap(value.expr))
            self.mark_printed("yes")
            return
        raise Unsupported(f"printing a {value.kind} object directly (Jinja prints a Python repr)", lineno)

    def stmt_If(self, node: nodes.If) -> None:
        branches = [(node.test, node.body)] + [(e.test, e.body) for e in node.elif_]
        pending: list[tuple[str, list[nodes.Node]]] = []
        else_body: list[nodes.Node] | None = node.else_
        for test_node, body in branches:
            if self.is_raise_only(body):
                self.notes.add("raise_exception is dropped (Go templates cannot raise)")
                test = self.try_truth(test_node)
                if isinstance(test, Const) and test.value:
                    # Jinja would raise here for every input: the translation renders as if it did not
                    return
                continue
            test = self.truth(self.eval(test_node), test_node.lineno)
            if isinstance(test, Const):
                if test.value:
                    else_body = body
                    break
                continue
            pending.append((test.expr, body))
        if not pending:
            if else_body:
                self.stmts(else_body)
            return
        self.runtime_branches(pending, else_body or [])

    def try_truth(self, test_node: nodes.Expr) -> Const | Rt | None:
        """Evaluate a test only to see whether it is constant; whatever it emitted is dropped."""
        saved_out = list(self.out)
        try:
            return self.truth(self.eval(test_node), test_node.lineno)
        except Unsupported:
            return None
        finally:
            self.out[:] = saved_out

    def is_raise_only(self, body: list[nodes.Node]) -> bool:
        calls = [n for n in body if not (isinstance(n, nodes.Output) and all(
            isinstance(c, nodes.TemplateData) and not c.data.strip() for c in n.nodes))]
        if len(calls) != 1 or not isinstance(calls[0], nodes.Output):
            return False
        exprs = [c for c in calls[0].nodes if not isinstance(c, nodes.TemplateData)]
        return len(exprs) == 1 and isinstance(exprs[0], nodes.Call) and isinstance(exprs[0].node, nodes.Name) \
            and exprs[0].node.name == "raise_exception"

    def runtime_branches(self, branches: list[tuple[str, list[nodes.Node]]], else_body: list[nodes.Node]) -> None:
        before_env = dict(self.env)
        before_printed = self.printed
        states = []
        self.runtime_depth += 1
        for i, (test, body) in enumerate(branches):
            self.emit("{{ " + ("if " if i == 0 else "else if ") + test + " }}")
            self.env = dict(before_env)
            self.printed = before_printed
            self.stmts(body)
            states.append((self.env, self.printed))
        if else_body:
            self.emit("{{ else }}")
            mark = len(self.out)
            self.env = dict(before_env)
            self.printed = before_printed
            self.stmts(else_body)
            if len(self.out) == mark:
                self.out.pop()  # an else that renders nothing (e.g. only raise_exception)
            states.append((self.env, self.printed))
        else:
            states.append((before_env, before_printed))
        self.emit("{{ end }}")
        self.runtime_depth -= 1
        self.merge_envs(before_env, [s[0] for s in states])
        printed = {s[1] for s in states}
        self.printed = printed.pop() if len(printed) == 1 else "maybe"

    def merge_envs(self, before: dict[str, Any], after: list[dict[str, Any]]) -> None:
        """Names whose binding differs between branches must be Go variables: restart if new ones appear."""
        new_forced = False
        for name in set().union(*[set(e) for e in after]):
            values = [e.get(name, self.name_value(name, None)) for e in after]
            if all(v is values[0] or v == values[0] for v in values):
                continue
            if isinstance(before.get(name), Namespace) or name.startswith("\x00"):
                continue
            kind = self.kind_of([v for v in values if isinstance(v, (Const, Rt))])
            if name not in self.forced:
                self.forced[name] = kind
                new_forced = True
        if new_forced:
            raise _Restart
        self.env = dict(after[0])

    @staticmethod
    def kind_of(values: list[Any]) -> str:
        kinds = set()
        for v in values:
            if isinstance(v, Rt) and v.kind == "splitlist" and len(v.parts) == 2:
                kinds.add("split:" + v.parts[1])
            elif isinstance(v, Rt):
                kinds.add(v.kind)
            elif isinstance(v, Const):
                if isinstance(v.value, bool):
                    kinds.add("bool")
                elif isinstance(v.value, int):
                    kinds.add("int")
                elif isinstance(v.value, str):
                    kinds.add("str")
                elif v.value is None or v.value is UNDEFINED or v.value == [] or v.value == {}:
                    continue  # empty values fit any list or mapping kind
                elif isinstance(v.value, list) and all(isinstance(x, str) for x in v.value):
                    kinds.add("acc")
                else:
                    kinds.add("any")
        if len(kinds) == 1:
            return kinds.pop()
        return "any" if kinds else "str"

    def stmt_Assign(self, node: nodes.Assign) -> None:
        target = node.target
        if isinstance(target, nodes.NSRef):
            ns = self.env.get(target.name)
            if not isinstance(ns, Namespace):
                raise Unsupported(f"assignment to {target.name}.{target.attr} without a namespace", node.lineno)
            value = self.eval(node.node)
            key = f"{ns.go_prefix}_{target.attr}"
            if key in self.forced:
                init = self.acc_items_literal(value) if self.forced[key] == "acc" else None
                self.emit("{{ " + f"${key} = {init or as_go(value, node.lineno)}" + " }}")
                return
            if self.loops or self.in_branch:
                old = ns.attrs.get(target.attr)
                if not (isinstance(old, Const) and isinstance(value, Const) and old == value):
                    self.forced[key] = self.kind_of([value, old] if old is not None else [value])
                    raise _Restart
            ns.attrs[target.attr] = value
            return
        if isinstance(target, nodes.Tuple):
            raise Unsupported("tuple assignment", node.lineno)
        name = target.name
        if isinstance(node.node, nodes.Call) and isinstance(node.node.node, nodes.Name) \
                and node.node.node.name == "namespace":
            self.env[name] = self.make_namespace(node.node, name)
            return
        value = self.eval(node.node)
        self.bind(name, value, node.lineno)

    @property
    def in_branch(self) -> bool:
        return self.runtime_depth > 0

    def bind(self, name: str, value: Const | Rt, lineno: int | None) -> None:
        if name in self.forced:
            self.emit("{{ " + f"${name} = {as_go(value, lineno)}" + " }}")
            defined = None
            current = self.env.get(name)
            if name in self.def_vars and isinstance(current, Rt) and current.defined == f"$def_{name}":
                defined = f"$def_{name}"
                # the flag doubles as "holds a value": a none counts as absent (rarely tested with `is defined`)
                present = not (isinstance(value, Const) and value.value in (None, UNDEFINED))
                self.emit("{{ " + f"{defined} = {'true' if present else 'false'}" + " }}")
            self.env[name] = self.forced_value(name, defined)
            if isinstance(value, Rt) and value.kind in ATTRS and value.kind != self.forced[name]:
                # until the next merge, the Go variable holds this value's type (a call, then its function)
                self.env[name] = Rt("$" + name, value.kind, defined=defined)
            return
        if isinstance(value, Rt) and (" " in value.expr or "(" in value.expr):
            go = self.fresh(name.replace("_", "")[:12] or "v")
            self.emit("{{ " + f"{go} := {value.expr}" + " }}")
            value = Rt(go, value.kind, value.parts if value.kind == "str" else (), value.defined)
            if value.kind == "str":
                value = Rt(go, "str", (), value.defined)
        self.env[name] = value

    def make_namespace(self, call: nodes.Call, name: str) -> Namespace:
        prefix = f"{name}{call.lineno}"
        ns = Namespace({}, prefix)
        for kw in call.kwargs:
            value = self.eval(kw.value)
            key = f"{prefix}_{kw.key}"
            if key in self.forced:
                init = self.acc_items_literal(value) if self.forced[key] == "acc" else None
                self.emit("{{ " + f"${key} := {init or as_go(value, call.lineno)}" + " }}")
                value = Rt("$" + key, self.forced[key])
            ns.attrs[kw.key] = value
        for key in list(self.forced):
            if key.startswith(prefix + "_") and key[len(prefix) + 1:] not in ns.attrs:
                self.emit("{{ " + f"${key} := \"\"" + " }}")
                ns.attrs[key[len(prefix) + 1:]] = Rt("$" + key, self.forced[key])
        if call.args:
            raise Unsupported("namespace() with positional arguments", call.lineno)
        return ns

    def stmt_AssignBlock(self, node: nodes.AssignBlock) -> None:
        if node.filter is not None:
            raise Unsupported("{% set %} block with a filter", node.lineno)
        value = self.capture(lambda: self.stmts(node.body))
        self.bind(node.target.name, value, node.lineno)

    def capture(self, body: Any) -> Const | Rt:
        """Run ``body`` (which translates statements) and return its output as a string value.

        Plain text and printed pipelines fold into a constant or a printf; output under runtime control flow
        is collected into a Go variable by turning every print into ``$cap = printf "%s..." $cap ...``.
        """
        saved_out, saved_printed, saved_fresh = self.out, self.printed, self.fresh_var
        self.out, self.fresh_var = [], None
        try:
            body()
            return self.captured_value(self.out, "", None)
        except Unsupported as exc:
            if exc.construct != "\x00capture":
                raise
        finally:
            self.out, self.printed, self.fresh_var = saved_out, saved_printed, saved_fresh
        cap = self.fresh("cap")
        self.emit("{{ " + f'{cap} := ""' + " }}")
        self.capture_vars.append(cap)
        saved_printed, saved_fresh = self.printed, self.fresh_var
        self.fresh_var = None
        try:
            body()
        finally:
            self.capture_vars.pop()
            self.printed, self.fresh_var = saved_printed, saved_fresh
        return Rt(cap, "str")

    def captured_value(self, pieces: list[str], construct: str, lineno: int | None) -> Const | Rt:
        """Captured output as a string value: literal text and plain printed pipelines only."""
        import re
        construct = "\x00capture"

        parts: list = []
        for piece in pieces:
            for i, chunk in enumerate(re.split(r"(\{\{ .*? \}\})", piece)):
                if i % 2 == 0:
                    parts.append(chunk)
                    continue
                inner = chunk[3:-3]
                if inner.startswith('"') and inner.endswith('"'):
                    parts.append(json.loads(inner))
                elif re.match(r"(if|else|end|range|break|continue|with)\b|\$\w+ :?=", inner):
                    raise Unsupported(construct, lineno)
                else:
                    parts.append(Rt(inner, "str"))
        return make_str(tuple(parts))

    MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"]

    def strftime(self, fmt: str, lineno: int | None) -> Const | Rt:
        """strftime_now(fmt) from Ollama's currentDate (YYYY-MM-DD) by slicing and a month table."""
        import re

        date = self.fresh("date")
        self.emit("{{ " + f"{date} := currentDate" + " }}")
        month_var: dict[str, str] = {}

        def month(full: bool) -> Rt:
            key = "B" if full else "b"
            if key not in month_var:
                go = self.fresh("month")
                chain = "".join(("{{ if " if i == 0 else "{{ else if ") + f'eq (slice {date} 5 7) "{i + 1:02d}"'
                                + " }}{{ " + f'{go} = "{name if full else name[:3]}"' + " }}"
                                for i, name in enumerate(self.MONTHS))
                self.emit("{{ " + f'{go} := ""' + " }}" + chain + "{{ end }}")
                month_var[key] = go
            return Rt(month_var[key], "str")

        fields = {"Y": lambda: Rt(f"slice {date} 0 4", "str"), "y": lambda: Rt(f"slice {date} 2 4", "str"),
                  "m": lambda: Rt(f"slice {date} 5 7", "str"), "d": lambda: Rt(f"slice {date} 8 10", "str"),
                  "b": lambda: month(False), "B": lambda: month(True), "%": lambda: "%"}
        parts: list = []
        for i, chunk in enumerate(re.split(r"%(.)", fmt)):
            if i % 2 == 0:
                parts.append(chunk)
            elif chunk in fields:
                parts.append(fields[chunk]())
            else:
                raise Unsupported(f"strftime_now format %{chunk} (Ollama only gives currentDate)", lineno)
        self.notes.add("strftime_now is computed from Ollama's currentDate")
        return make_str(tuple(parts))

    def stmt_Macro(self, node: nodes.Macro) -> None:
        self.env[node.name] = Macro(node)

    def macro_args(self, m: nodes.Macro, call: nodes.Call, caller_env: dict[str, Any]) -> dict[str, Any]:
        defaults = dict(zip([a.name for a in m.args][len(m.args) - len(m.defaults):], m.defaults))
        values: dict[str, Any] = {}
        for i, arg in enumerate(m.args):
            if i < len(call.args):
                values[arg.name] = self.eval_in(caller_env, call.args[i])
            elif any(k.key == arg.name for k in call.kwargs):
                values[arg.name] = self.eval_in(caller_env, next(k.value for k in call.kwargs if k.key == arg.name))
            elif arg.name in defaults:
                values[arg.name] = self.eval(defaults[arg.name])
            else:
                values[arg.name] = Const(UNDEFINED)
        return values

    def recursive_call(self, macro: Macro, call: nodes.Call) -> None:
        """A recursive macro call becomes a Go `{{ template }}` call of a `define`d template.

        Go templates recurse through named templates whose dot is one argument: the macro is specialised per
        constant arguments and the kind of its single runtime argument, which becomes `$` inside.
        """
        m = macro.node
        saved_out = list(self.out)
        used = {n.name for stmt in m.body for n in [stmt, *stmt.find_all(nodes.Name)] if isinstance(n, nodes.Name)}
        args = {k: v for k, v in self.macro_args(m, call, self.env).items() if k in used}  # unused: no argument
        runtime = [(name, v) for name, v in args.items() if isinstance(v, Rt)]
        if len(runtime) > 1 and not self.capture_vars:
            self.out[:] = saved_out  # the arguments will be computed inside the Go template instead
            self.rerooted_call(macro, call)
            return
        if len(runtime) != 1 or self.capture_vars or \
                not all(isinstance(v, Const) and isinstance(v.value, (str, int, bool, type(None), _Undefined,
                                                                      list, dict))
                        for v in args.values() if not isinstance(v, Rt)):
            raise Unsupported(f"recursive macro {m.name}", call.lineno)
        arg_name, arg = runtime[0]
        consts = tuple((k, repr(v.value)) for k, v in args.items() if isinstance(v, Const))
        key = (m.name, consts, arg_name, arg.kind)
        if key not in self.defines:
            name = f"{m.name}_{len(self.defines) + 1}"
            self.defines[key] = name
            self.define_jobs.append((key, name, macro, args, arg_name, arg.kind))
        self.emit("{{ template " + go_string(self.defines[key]) + " " + wrap(arg.expr) + " }}")
        self.mark_printed("maybe")

    def rerooted_call(self, macro: Macro, call: nodes.Call) -> None:
        """A recursive call with several runtime arguments that all derive from one runtime variable:
        pass that variable as the Go template's dot and compute the arguments inside the template."""
        m = macro.node
        arg_nodes = list(call.args) + [k.value for k in call.kwargs]
        roots = {n.name for a in arg_nodes for n in [a, *a.find_all(nodes.Name)]  # find_all skips `a` itself
                 if isinstance(n, nodes.Name) and isinstance(self.env.get(n.name), Rt)}
        if len(roots) != 1:
            raise Unsupported(f"recursive macro {m.name} with several runtime arguments", call.lineno)
        root = roots.pop()
        value = self.env[root]
        dump = repr([a.dump() if hasattr(a, "dump") else repr(a) for a in arg_nodes]) + repr(
            [k.key for k in call.kwargs])
        key = (m.name, "reroot", root, value.kind, dump)
        if key not in self.defines:
            name = f"{m.name}_{len(self.defines) + 1}"
            self.defines[key] = name
            self.define_jobs.append((key, name, macro, {"\x00call": call}, root, value.kind))
        self.emit("{{ template " + go_string(self.defines[key]) + " " + wrap(value.expr) + " }}")
        self.mark_printed("maybe")

    def emit_defines(self) -> None:
        """Translate the pending recursive macros into `{{ define }}` blocks (appended to the template)."""
        done: set[str] = set()
        while self.define_jobs:
            key, name, macro, args, arg_name, kind = self.define_jobs.pop(0)
            if name in done:
                continue
            done.add(name)
            saved = (self.out, self.env, self.loops, self.printed, self.fresh_var, self.macros_active)
            self.out, self.loops, self.printed, self.fresh_var = [], [], "yes", None
            self.env = {k: v for k, v in self.globals_env.items() if isinstance(v, Macro)}
            if "\x00call" in args:
                # re-rooted: bind the root variable to the dot, then evaluate the call's arguments here
                call = args["\x00call"]
                self.env[arg_name] = Rt("$", kind)
                self.env.update(self.macro_args(macro.node, call, dict(self.env)))
            else:
                self.env.update({k: v for k, v in args.items()})
                self.env[arg_name] = Rt("$", kind)
            self.macros_active = [macro.node.name]
            self.declare_forced(macro.node.body, self.env)
            self.stmts(macro.node.body)
            body = "".join(self.out)
            self.out, self.env, self.loops, self.printed, self.fresh_var, self.macros_active = saved
            self.emit("{{ define " + go_string(name) + " }}" + body + "{{ end }}")

    def inline_macro(self, macro: Macro, call: nodes.Call) -> None:
        m = macro.node
        if m.name in self.macros_active:
            self.recursive_call(macro, call)
            return
        saved = self.env
        self.env = dict(saved)
        defaults = dict(zip([a.name for a in m.args][len(m.args) - len(m.defaults):], m.defaults))
        for i, arg in enumerate(m.args):
            if i < len(call.args):
                value = self.eval_in(saved, call.args[i])
            elif any(k.key == arg.name for k in call.kwargs):
                value = self.eval_in(saved, next(k.value for k in call.kwargs if k.key == arg.name))
            elif arg.name in defaults:
                value = self.eval(defaults[arg.name])
            else:
                value = Const(UNDEFINED)
            self.env[arg.name] = value
        self.macros_active.append(m.name)
        self.declare_forced(m.body, self.env)
        self.stmts(m.body)
        self.macros_active.pop()
        self.env = saved

    def eval_in(self, env: dict[str, Any], expr: nodes.Expr) -> Const | Rt:
        current = self.env
        self.env = env
        try:
            return self.eval(expr)
        finally:
            self.env = current

    def stmt_CallBlock(self, node: nodes.CallBlock) -> None:
        if isinstance(node.call, nodes.Call) and isinstance(node.call.node, nodes.ExtensionAttribute):
            self.stmts(node.body)  # {% generation %}: keep the body
            return
        call = node.call
        target = self.env.get(call.node.name) if isinstance(call, nodes.Call) and \
            isinstance(call.node, nodes.Name) else None
        if not isinstance(target, Macro) or node.args or target.node.name in self.macros_active:
            raise Unsupported("{% call %} block (recursive or with arguments)", node.lineno)
        # {% call m(...) %}body{% endcall %}: inline m with `caller()` inlining the body
        caller = Macro(nodes.Macro("caller", [], [], node.body, lineno=node.lineno))
        self.env["caller"] = caller
        try:
            self.inline_macro(target, call)
        finally:
            self.env.pop("caller", None)

    def stmt_Scope(self, node: nodes.Scope) -> None:
        self.stmts(node.body)

    def stmt_Continue(self, node: nodes.Continue) -> None:
        self.emit("{{ continue }}")

    def stmt_Break(self, node: nodes.Break) -> None:
        self.emit("{{ break }}")

    def stmt_For(self, node: nodes.For) -> None:
        if node.recursive:
            raise Unsupported("recursive for loop", node.lineno)
        iterable = self.eval(node.iter)
        if isinstance(iterable, Const):
            self.unrolled_for(node, iterable)
            return
        if iterable.kind in ATTRS and iterable.kind != "message" and not node.else_:
            self.struct_keys_for(node, iterable)
            return
        if iterable.kind == "structitems":
            self.struct_items_for(node, iterable.parts[0])
            return
        if iterable.kind == "splitlist" and len(iterable.parts) == 1 and isinstance(node.target, nodes.Name) \
                and not node.else_ and node.test is None \
                and not uses_loop(node.body):
            # content split on a thinking tag is one part, the content itself (Ollama strips thinking)
            saved_env = self.env
            self.env = dict(saved_env)
            self.env[node.target.name] = iterable.parts[0]
            self.stmts(node.body)
            assigned = {k: v for k, v in self.env.items() if isinstance(v, Namespace) and k in saved_env}
            self.env = saved_env
            self.env.update(assigned)
            return
        if iterable.kind in ("properties", "arguments") and isinstance(node.target, nodes.Name):
            iterable = Rt(iterable.expr, "items", (iterable.kind,))
            node = nodes.For(nodes.Tuple([node.target, nodes.Name("\x00value", "store")], "store"), node.iter,
                             node.body, node.else_, node.test, node.recursive, lineno=node.lineno)
            return self.stmt_For(node) if False else self._for_items_keys(node, iterable)
        items_of_map = iterable.kind == "items"
        reverse = iterable.parts == ("reversed",)
        chars = iterable.kind == "str"
        if iterable.kind == "acc":
            if not isinstance(node.target, nodes.Name) or node.else_ or node.test is not None:
                raise Unsupported("for loop over a runtime list with options", node.lineno)
            k, s, cur, ch = self.fresh("k"), self.fresh("s"), self.fresh("cur"), self.fresh("ch")
            self.emit("{{ " + f"{s} := {iterable.expr}" + " }}{{ " + f'{cur} := ""' + " }}{{ range "
                      + f"{k} := len {s}" + " }}{{ " + f"{ch} := slice {s} {k} ({int_plus(k, '1')})" + " }}{{ if "
                      + f"ne {ch} {go_string(self.ACC_SEP)}" + " }}{{ " + f'{cur} = printf "%s%s" {cur} {ch}'
                      + " }}{{ continue }}{{ end }}")
            saved_env, saved_loops = self.env, self.loops
            self.env = dict(saved_env)
            item = self.fresh("item")
            self.emit("{{ " + f"{item} := {cur}" + " }}{{ " + f'{cur} = ""' + " }}")
            self.env[node.target.name] = Rt(item, "str")
            self.env["loop"] = Const({})
            before_printed = self.printed
            self.printed = "maybe" if before_printed != "yes" else "yes"
            self.declare_forced(node.body, self.env, shadow=True)
            self.stmts(node.body)
            self.emit("{{ end }}")
            self.env, self.loops = saved_env, saved_loops
            self.printed = "yes" if before_printed == "yes" else "maybe"
            return
        if iterable.kind == "intrange":
            if not isinstance(node.target, nodes.Name) or node.else_ or node.test is not None:
                raise Unsupported("for loop over range() with options", node.lineno)
            k = self.fresh("n")
            reverse = iterable.parts[:1] == ("rev",)
            if reverse:
                self.emit("{{ if " + f"ge {wrap(iterable.parts[1])} 0" + " }}")
            self.emit("{{ range " + f"{k} := {wrap(iterable.expr)}" + " }}")
            saved_env, saved_loops = self.env, self.loops
            self.env = dict(saved_env)
            value = int_minus(iterable.parts[1], k) if reverse else \
                int_plus(k, iterable.parts[0]) if iterable.parts else k
            self.env[node.target.name] = Rt(value, "int")
            self.loops = saved_loops + [LoopInfo(k, f"(slice (printf \"%*s\" {wrap(iterable.expr)} \"\") 0)", False)]
            self.env["loop"] = self.loops[-1]
            before_printed = self.printed
            self.printed = "maybe" if before_printed != "yes" else "yes"
            self.declare_forced(node.body, self.env, shadow=True)
            self.stmts(node.body)
            self.emit("{{ end }}" + ("{{ end }}" if reverse else ""))
            self.env, self.loops = saved_env, saved_loops
            self.printed = "yes" if before_printed == "yes" else "maybe"
            return
        if not items_of_map and not chars and iterable.kind not in ELEMENT_KIND:
            raise Unsupported(f"for loop over a {iterable.kind}", node.lineno)
        if node.else_ and iterable.parts:
            raise Unsupported("for ... else on a filtered list", node.lineno)
        matched = None
        if node.else_ and node.test is not None:
            # Jinja's else runs when no item passed the filter: track it in a flag
            matched = self.fresh("matched")
            self.emit("{{ " + f"{matched} := false" + " }}")
        list_var = iterable.expr if iterable.expr.startswith("$") and " " not in iterable.expr \
            else self.fresh("list")
        if list_var != iterable.expr:
            self.emit("{{ " + f"{list_var} := {iterable.expr}" + " }}")
        index_var = self.fresh("i")
        saved_env, saved_loops, saved_fresh, saved_line = self.env, self.loops, self.fresh_var, self.current_loop_line
        if node.lineno in self.bos_loops and self.fresh_var is None:
            self.fresh_var = self.fresh("fresh")
            self.emit("{{ " + f"{self.fresh_var} := true" + " }}")
        self.env = dict(saved_env)
        if items_of_map:
            if not isinstance(node.target, nodes.Tuple) or len(node.target.items) != 2:
                raise Unsupported("for loop over items() without (key, value)", node.lineno)
            key_var, value_var, seen = self.fresh("k"), self.fresh("v"), self.fresh("seen")
            # a map range has no index: count iterations for loop.index/first/last
            self.emit("{{ " + f"{index_var} := 0" + " }}{{ " + f"{seen} := false" + " }}")
            self.emit("{{ range " + f"{key_var}, {value_var} := {list_var}" + " }}{{ if " + seen + " }}{{ "
                      + f"{index_var} = {int_plus(index_var, '1')}" + " }}{{ end }}{{ " + f"{seen} = true" + " }}")
            self.env[node.target.items[0].name] = Rt(key_var, "str")
            self.env[node.target.items[1].name] = Rt(value_var, "any" if iterable.parts in (("arguments",), ("any",))
                                                     else "property")
        else:
            if not isinstance(node.target, nodes.Name):
                raise Unsupported("for loop with tuple unpacking", node.lineno)
            elem = self.fresh(node.target.name.replace("_", "")[:8] or "x")
            if reverse or chars:
                # Go >= 1.22 ranges over an int: walk indexes, newest first for a reversed list
                position = int_minus(int_minus(f"len {list_var}", "1"), index_var) if reverse else index_var
                item = f"slice {list_var} {index_var} ({int_plus(index_var, '1')})" if chars \
                    else f"index {list_var} ({position})"
                self.emit("{{ range " + f"{index_var} := len {list_var}" + " }}{{ " + f"{elem} := {item}" + " }}")
                self.env[node.target.name] = Rt(elem, "char" if chars else ELEMENT_KIND[iterable.kind])
            else:
                self.emit("{{ range " + f"{index_var}, {elem} := {list_var}" + " }}")
                elem_kind = ELEMENT_KIND[iterable.kind]
                identity = ("elem", list_var, index_var) if elem_kind != "str" else ()
                self.env[node.target.name] = Rt(elem, elem_kind, identity)
                if iterable.parts[:1] == ("filter",):
                    pred = self.filter_predicate(iterable, elem, node.lineno)
                    self.emit("{{ if not " + wrap(pred) + " }}{{ continue }}{{ end }}")
                    filtered_iteration = True
        self.list_kind[list_var] = iterable.kind
        self.loops = saved_loops + [LoopInfo(index_var, list_var, node.test is not None or
                                             iterable.parts[:1] == ("filter",))]
        self.env["loop"] = self.loops[-1]
        self.current_loop_line = node.lineno
        before_printed = self.printed
        self.printed = "maybe" if before_printed != "yes" else "yes"
        self.declare_forced(node.body, self.env, shadow=True)
        if node.test is not None:
            test = self.truth(self.eval(node.test), node.lineno)
            if isinstance(test, Const):
                if not test.value:
                    self.emit("{{ continue }}")
            else:
                self.emit("{{ if not " + wrap(test.expr) + " }}{{ continue }}{{ end }}")
        if matched:
            self.emit("{{ " + f"{matched} = true" + " }}")
        body_env_start = dict(self.env)
        loop_start = len(self.out)
        self.stmts(node.body)
        if chars and len(self.out) == loop_start:
            self.out.pop()  # iterating a string's characters did nothing: drop the loop
            if list_var != iterable.expr:
                self.out.pop()
        else:
            if node.else_ and not matched:
                self.env = dict(saved_env)
                self.emit("{{ else }}")  # Go's range-else runs when the list is empty, as Jinja's for-else
                self.stmts(node.else_)
            self.emit("{{ end }}")
            if matched:
                self.env = dict(saved_env)
                self.emit("{{ if not " + matched + " }}")
                self.stmts(node.else_)
                self.emit("{{ end }}")
        # names assigned inside the body do not leak (Jinja scoping); namespace changes were forced
        self.check_loop_namespaces(body_env_start)
        self.env, self.loops, self.current_loop_line = saved_env, saved_loops, saved_line
        self.fresh_var = saved_fresh
        self.printed = "yes" if before_printed == "yes" else "maybe"

    def check_loop_namespaces(self, start: dict[str, Any]) -> None:
        pass

    def _for_items_keys(self, node: nodes.For, iterable: Rt) -> None:
        """`for key in mapping`: a Go map range over (key, value), keeping the key."""
        saved = self.eval
        self.eval = lambda expr, _orig=saved: iterable if expr is node.iter else _orig(expr)  # type: ignore
        try:
            self.stmt_For(node)
        finally:
            self.eval = saved  # type: ignore

    def struct_keys_for(self, node: nodes.For, struct: Rt) -> None:
        """`for key in obj` over an Ollama struct: unroll its fields; optional ones only when present."""
        if not isinstance(node.target, nodes.Name):
            raise Unsupported("for loop with tuple unpacking over a mapping", node.lineno)
        saved = self.env
        for key in ATTRS[struct.kind]:
            if key in ("reasoning", "thinking"):
                continue
            value = self.getattr(struct, key, node.lineno)
            self.env = dict(saved)
            self.env[node.target.name] = Const(key)
            self.env["loop"] = Const({})
            if node.test is not None:
                test = self.truth(self.eval(node.test), node.lineno)
                if isinstance(test, Rt):
                    raise Unsupported("a runtime filter on a loop over a mapping's keys", node.lineno)
                if not test.value:
                    continue
            present = value.defined if isinstance(value, Rt) else None
            if present:
                self.emit("{{ if " + present + " }}")
            self.stmts(node.body)
            if present:
                self.emit("{{ end }}")
        self.env = saved
        self.notes.add("loops over a mapping's keys visit Ollama's fields")

    # A JSON-schema property as Ollama holds it (its Go struct's fields), keys in sorted order.
    PROPERTY_FIELDS = (("description", "Description", "str"), ("enum", "Enum", "list"), ("items", "Items", "any"),
                       ("properties", "Properties", "properties"), ("required", "Required", "strlist"),
                       ("type", "Type", "str"))

    def struct_items_for(self, node: nodes.For, struct: Rt) -> None:
        """`for key, value in property | dictsort`: unroll over the fields Ollama's property has, in key order,
        each only when present (Ollama's JSON omits empty fields)."""
        if not (isinstance(node.target, nodes.Tuple) and len(node.target.items) == 2
                and all(isinstance(t, nodes.Name) for t in node.target.items)) or node.else_ \
                or node.test is not None or uses_loop(node.body):
            raise Unsupported("loop over a schema property's items with options", node.lineno)
        key_name, value_name = (t.name for t in node.target.items)
        saved = self.env
        for key, go_field, kind in self.PROPERTY_FIELDS:
            field = f"{wrap(struct.expr)}.{go_field}"
            value = Rt(f"print {field}" if key == "type" else field, kind, defined=field)
            self.env = dict(saved)
            self.env[key_name], self.env[value_name] = Const(key), value
            self.emit("{{ if " + (f"len {field}" if key == "type" else field) + " }}")
            self.stmts(node.body)
            self.emit("{{ end }}")
            self.env = {**saved, **{k: v for k, v in self.env.items() if isinstance(v, Namespace) and k in saved}}
        self.notes.add("loops over a schema property's items visit the fields of Ollama's property")

    def unrolled_for(self, node: nodes.For, iterable: Const) -> None:
        items = list(iterable.value or [])  # a mapping iterates over its keys
        if node.else_ and not items:
            self.stmts(node.else_)
            return
        saved = self.env

        def as_value(v: Any) -> Any:
            return v if isinstance(v, (Const, Rt)) else Const(v)

        for i, item in enumerate(items):
            self.env = dict(saved)
            if isinstance(node.target, nodes.Tuple):
                for t, v in zip(node.target.items, item):
                    self.env[t.name] = as_value(v)
            else:
                self.env[node.target.name] = as_value(item)
            self.env["loop"] = Const({"index0": i, "index": i + 1, "first": i == 0, "last": i == len(items) - 1,
                                      "length": len(items)})
            if node.test is not None:
                test = self.truth(self.eval(node.test), node.lineno)
                if isinstance(test, Rt):
                    raise Unsupported("a runtime filter on an unrolled loop", node.lineno)
                if not test.value:
                    continue
            self.stmts(node.body)
        self.env = saved

    def stmt_With(self, node: nodes.With) -> None:
        saved = self.env
        self.env = dict(saved)
        for target, value in zip(node.targets, node.values):
            self.env[target.name] = self.eval(value)
        self.stmts(node.body)
        self.env = saved

    def stmt_ExprStmt(self, node: nodes.ExprStmt) -> None:
        raise Unsupported("{% do %} statement", node.lineno)

    # ------------------------------------------------------------ expressions
    def eval(self, expr: nodes.Expr) -> Const | Rt:
        handler = getattr(self, f"eval_{type(expr).__name__}", None)
        if handler is None:
            raise Unsupported(f"expression {type(expr).__name__}", expr.lineno)
        return handler(expr)

    def eval_Const(self, expr: nodes.Const) -> Const:
        return Const(expr.value)

    def eval_TemplateData(self, expr: nodes.TemplateData) -> Const:
        return Const(expr.data)

    def eval_List(self, expr: nodes.List) -> Const | Rt:
        items = [self.eval(i) for i in expr.items]
        if all(isinstance(i, Const) for i in items):
            return Const([i.value for i in items])
        if isinstance(expr, nodes.List) and all(isinstance(i, Rt) and i.kind == "str" or isinstance(i, Const)
                                                and isinstance(i.value, str) for i in items):
            return self.to_acc(Const([]), items)
        raise Unsupported("a list literal holding runtime values", expr.lineno)

    def eval_Tuple(self, expr: nodes.Tuple) -> Const:
        items = [self.eval(i) for i in expr.items]
        if not all(isinstance(i, Const) for i in items):
            raise Unsupported("a tuple holding runtime values", expr.lineno)
        return Const([i.value for i in items])

    # A runtime list of strings is kept as one Go string, each item followed by ACC_SEP.
    ACC_SEP = "\x1f"

    def to_acc(self, base: Const | Rt, items: list) -> Rt:
        parts: tuple = str_parts(base) if isinstance(base, Rt) else tuple(
            v + self.ACC_SEP for v in base.value)
        for item in items:
            parts += str_parts(item) + (self.ACC_SEP,)
        value = make_str(parts)
        self.notes.add("runtime lists of strings are kept as separator-joined Go strings")
        return Rt(value.expr if isinstance(value, Rt) else go_string(value.value), "acc")

    def acc_items_literal(self, value: Any) -> str | None:
        if isinstance(value, Const) and isinstance(value.value, list) and all(isinstance(v, str) for v in value.value):
            return go_string("".join(v + self.ACC_SEP for v in value.value))
        return None

    def eval_Dict(self, expr: nodes.Dict) -> Const:
        out = {}
        for pair in expr.items:
            k, v = self.eval(pair.key), self.eval(pair.value)
            if not (isinstance(k, Const) and isinstance(v, Const)):
                raise Unsupported("a dict literal holding runtime values", expr.lineno)
            out[k.value] = v.value
        return Const(out)

    def name_value(self, name: str, lineno: int | None) -> Any:
        if name == "messages":
            return Rt("$.Messages", "messages")
        if name == "tools":
            return Rt("$.Tools", "tools")
        if name == "add_generation_prompt":
            return Const(True)
        if name in ("enable_thinking",):
            return Rt("$.Think", "bool", defined="$.IsThinkSet")
        if name in self.tokens:
            return Const(self.tokens[name])
        if name in ("documents", "raise_exception", "strftime_now", "namespace", "dict", "range"):
            return Const(None)
        return Const(UNDEFINED)

    def eval_Name(self, expr: nodes.Name) -> Any:
        if expr.name in self.env:
            value = self.env[expr.name]
            if isinstance(value, (Const, Rt)):
                return value
            if isinstance(value, LoopInfo):
                return value  # only attribute access is meaningful
            if isinstance(value, Namespace):
                return value
            raise Unsupported(f"using {expr.name} as a value", expr.lineno)
        if expr.name == "bos_token" and "bos_token" in self.tokens:
            self.notes.add("bos_token inside an expression is printed literally")
        return self.name_value(expr.name, expr.lineno)

    def eval_NSRef(self, expr: nodes.NSRef) -> Any:
        return self.getattr(self.eval_Name(nodes.Name(expr.name, "load", lineno=expr.lineno)), expr.attr,
                            expr.lineno)

    def eval_Getattr(self, expr: nodes.Getattr) -> Any:
        return self.getattr(self.eval(expr.node), expr.attr, expr.lineno)

    def eval_Getitem(self, expr: nodes.Getitem) -> Any:
        base = self.eval(expr.node)
        if isinstance(expr.arg, nodes.Slice):
            return self.slice(base, expr.arg)
        key = self.eval(expr.arg)
        if isinstance(key, Const) and isinstance(key.value, str):
            if isinstance(base, Rt) and base.kind == "str":
                return Const(UNDEFINED)  # a string indexed by a key: Jinja gives undefined
            if isinstance(base, Rt) and base.kind == "property" and key.value == "items":
                # x['items'] is the schema key (x.items would be the dict method)
                go = f"{wrap(base.expr)}.Items"
                return Rt(go, "any", defined=go)
            return self.getattr(base, key.value, expr.lineno)
        if isinstance(base, Const) and isinstance(key, Const):
            try:
                return Const(base.value[key.value])
            except (IndexError, KeyError, TypeError):
                return Const(UNDEFINED)
        if isinstance(base, Const) and isinstance(base.value, dict) and isinstance(key, Rt) and key.kind == "str" \
                and all(isinstance(v, (str, int, bool)) for v in base.value.values()):
            go = self.fresh("lookup")
            chain = "".join(("{{ if " if i == 0 else "{{ else if ") + f"eq {wrap(key.expr)} {go_string(k)}" + " }}{{ "
                            + f"{go} = {go_literal(v, expr.lineno)}" + " }}" for i, (k, v) in enumerate(base.value.items()))
            self.emit("{{ " + f'{go} := ""' + " }}" + chain + "{{ end }}")
            return Rt(go, self.kind_of([Const(v) for v in base.value.values()]))
        if isinstance(base, Rt) and base.parts[:1] == ("filter",) and isinstance(key, Const) \
                and key.value in (0, -1):
            return self.runtime_filter("first" if key.value == 0 else "last", base, [], {}, expr.lineno)
        if isinstance(base, Rt) and base.kind in ELEMENT_KIND:
            if isinstance(key, Const) and isinstance(key.value, int):
                if key.value >= 0:
                    return Rt(f"index {wrap(base.expr)} {key.value}", ELEMENT_KIND[base.kind])
                length = f"len {wrap(base.expr)}"
                return Rt(f"index {wrap(base.expr)} ({int_minus(length, str(-key.value))})",
                          ELEMENT_KIND[base.kind])
            if isinstance(key, Rt) and key.kind == "int":
                return Rt(f"index {wrap(base.expr)} {wrap(key.expr)}", ELEMENT_KIND[base.kind])
        if isinstance(base, Rt) and base.kind == "str" and isinstance(key, Const) and isinstance(key.value, int):
            return Rt("\"\"", "char")  # a character: templates only probe it for part fields (undefined)
        if isinstance(base, Rt) and base.kind == "arguments" and isinstance(key, Rt):
            return Rt(f"index {wrap(base.expr)} {wrap(key.expr)}", "any")
        raise Unsupported("indexing a runtime value", expr.lineno)

    def slice(self, base: Any, s: nodes.Slice) -> Any:
        start = self.eval(s.start) if s.start else Const(None)
        stop = self.eval(s.stop) if s.stop else Const(None)
        step = self.eval(s.step) if s.step else Const(None)
        if isinstance(base, Const) and all(isinstance(v, Const) for v in (start, stop, step)):
            return Const(base.value[start.value:stop.value:step.value])
        if isinstance(base, Rt) and base.kind == "str" and step.value is None and \
                all(isinstance(b, Const) and (b.value is None or isinstance(b.value, int)) or
                    isinstance(b, Rt) and b.kind == "int" for b in (start, stop)):
            # byte slicing: exact for ASCII text, which is what templates cut (trailing commas, brackets)
            text = wrap(base.expr)
            if all(isinstance(b, Rt) or b.value is None or b.value >= 0 for b in (start, stop)):
                # printf's precision counts runes and clamps, exactly like Python's str slicing
                expr = text
                if not (isinstance(stop, Const) and stop.value is None):
                    expr = f'printf "%.*s" {wrap(as_go(stop, s.lineno))} {text}'
                if not (isinstance(start, Const) and start.value in (None, 0)):
                    expr = f'slice ({expr}) (len (printf "%.*s" {wrap(as_go(start, s.lineno))} {text}))'
                return Rt(expr, "str")
            length = f"len {text}"
            bounds = [b.expr if isinstance(b, Rt) else None if b.value is None else str(b.value) if b.value >= 0
                      else int_minus(length, str(-b.value)) for b in (start, stop)]
            expr = f"slice {text} {wrap(bounds[0] or '0')}" + (f" ({bounds[1]})" if bounds[1] else "")
            self.notes.add("string slices from the end cut bytes (exact for ASCII)")
            return Rt(expr, "str")
        if isinstance(base, Rt) and base.kind in ELEMENT_KIND and step.value == -1 and start.value is None \
                and stop.value is None and not base.parts:
            return Rt(base.expr, base.kind, ("reversed",))
        if not isinstance(base, Rt) or base.kind not in ELEMENT_KIND or step.value is not None:
            raise Unsupported("slicing a runtime value (reversed or stepped lists, strings)", s.lineno)
        args = []
        for bound in (start, stop):
            if isinstance(bound, Const) and bound.value is None:
                args.append(None)
            elif isinstance(bound, Const) and isinstance(bound.value, int):
                if bound.value >= 0:
                    args.append(str(bound.value))
                else:
                    args.append(int_minus(f"len {wrap(base.expr)}", str(-bound.value)))
            elif isinstance(bound, Rt) and bound.kind == "int":
                args.append(bound.expr)
            else:
                raise Unsupported("slice bound", s.lineno)
        lo = args[0] or "0"
        expr = f"slice {wrap(base.expr)} {wrap(lo)}" + (f" {wrap(args[1])}" if args[1] else "")
        return Rt(expr, base.kind)

    def getattr(self, base: Any, attr: str, lineno: int | None) -> Any:
        if isinstance(base, Namespace):
            if attr not in base.attrs:
                return Const(UNDEFINED)
            return base.attrs[attr]
        if isinstance(base, LoopInfo):
            return self.loop_attr(base, attr, lineno)
        if isinstance(base, Const):
            value = base.value
            if isinstance(value, dict):
                return Const(value.get(attr, UNDEFINED))
            if value is UNDEFINED or value is None:
                if value is None:
                    raise Unsupported(f"attribute {attr} of none", lineno)
                return Const(UNDEFINED)
            if isinstance(value, str) and hasattr(str, attr):
                return Const(("method", value, attr))
            return Const(UNDEFINED)
        if base.kind == "char":
            return Const(UNDEFINED)
        if (base.kind, attr) in CONST_ATTRS:
            return Const(CONST_ATTRS[(base.kind, attr)])
        table = ATTRS.get(base.kind)
        if table is None:
            if base.kind == "str" and attr in ("strip", "lstrip", "rstrip", "split", "startswith", "endswith",
                                               "upper", "lower", "replace", "title", "capitalize", "find"):
                return Rt(base.expr, "method", (base, attr))
            if base.kind in ("properties", "arguments") and attr == "items":
                return Rt(base.expr, "method", (base, attr))
            if base.kind == "message" and attr == "get":
                return Rt(base.expr, "method", (base, attr))
            if base.kind == "str":
                return Const(UNDEFINED)  # Jinja: a string has no such attribute
            if base.kind in ("list", "strlist") and not hasattr(list, attr):
                return Const(UNDEFINED)  # Jinja: neither a list's attribute nor its item
            if base.kind == "any" and attr in ("get", "items", "keys"):
                return Rt(base.expr, "method", (base, attr))
            if base.kind == "any":
                # an untyped JSON object (a schema's items, an argument value): a map lookup in Go
                expr = f"index {wrap(base.expr)} {go_string(attr)}"
                guard = f'and (eq (printf "%T" {wrap(base.expr)}) "map[string]interface {{}}") ({expr})'
                self.notes.add("fields of untyped JSON objects are looked up as map keys")
                return Rt(expr, "any", defined=guard)
            if base.kind in ("property", "arguments"):
                raise Unsupported(f"attribute {attr} of a {base.kind}", lineno)
            raise Unsupported(f"attribute {attr} of a {base.kind}", lineno)
        if attr not in table:
            if attr in ("items", "keys", "get"):
                return Rt(base.expr, "method", (base, attr))
            if base.kind == "message" and attr in ("get",):
                return Rt(base.expr, "method", (base, attr))
            if base.kind in ("properties",) and attr == "items":
                return Rt(base.expr, "method", (base, attr))
            self.notes.add(f"message fields Ollama does not carry are undefined ({base.kind}.{attr})")
            return Const(UNDEFINED)
        go_field, kind = table[attr]
        expr = f"{wrap(base.expr)}.{go_field}" if not base.expr.startswith("$") or " " in base.expr \
            else f"{base.expr}.{go_field}"
        if (base.kind, attr) == ("property", "type"):
            expr = f"print {expr}"  # a schema type is a list type in Ollama; print gives its name
        defined = None if (base.kind, attr) in ALWAYS_DEFINED else expr
        return Rt(expr, kind, defined=defined)

    def loop_attr(self, loop: LoopInfo, attr: str, lineno: int | None) -> Any:
        if loop.filtered and attr not in ("first",):
            raise Unsupported(f"loop.{attr} in a filtered for loop", lineno)
        i, lst = loop.index_var, loop.list_var
        table = {
            "index0": lambda: Rt(i, "int"),
            "index": lambda: Rt(int_plus(i, "1"), "int"),
            "first": lambda: Rt(f"eq {i} 0", "bool"),
            "last": lambda: Rt(f"eq (len {lst}) ({int_plus(i, '1')})", "bool"),
            "length": lambda: Rt(f"len {lst}", "int"),
            "revindex0": lambda: Rt(int_minus(f"len (slice {lst} {i})", "1"), "int"),
            "revindex": lambda: Rt(f"len (slice {lst} {i})", "int"),
        }
        if attr in ("previtem", "nextitem"):
            elem = ELEMENT_KIND.get(self.list_kind.get(lst, ""), None)
            if elem is None:
                raise Unsupported(f"loop.{attr}", lineno)
            if attr == "previtem":
                return Rt(f"index {lst} ({int_minus(i, '1')})", elem, defined=i)
            return Rt(f"index {lst} ({int_plus(i, '1')})", elem, defined=f"ne (len (slice {lst} {i})) 1")
        if attr not in table:
            raise Unsupported(f"loop.{attr}", lineno)
        return table[attr]()

    def truth(self, value: Any, lineno: int | None) -> Const | Rt:
        if isinstance(value, Const):
            return Const(bool(value.value))
        if isinstance(value, Rt) and value.parts[:1] == ("filter",):
            return Rt(self.filter_summary(value, lineno)["count"], "int")
        if isinstance(value, Rt) and value.defined and value.kind in ("message", "toolcall", "tool"):
            return Rt(value.defined, "bool")
        if isinstance(value, Namespace):
            return Const(True)
        if value.kind in ("message", "toolcall", "tool", "tcfunction", "toolfunction", "parameters"):
            return Const(True)
        return value

    def eval_Not(self, expr: nodes.Not) -> Any:
        value = self.truth(self.eval(expr.node), expr.lineno)
        if isinstance(value, Const):
            return Const(not value.value)
        return Rt(f"not {wrap(value.expr)}", "bool")

    def eval_And(self, expr: nodes.And) -> Any:
        left = self.eval(expr.left)
        lt = self.truth(left, expr.lineno)
        if isinstance(lt, Const):
            return self.eval(expr.right) if lt.value else left
        right = self.eval(expr.right)
        rt = self.truth(right, expr.lineno)
        if isinstance(rt, Const):
            return Rt(lt.expr, "bool") if rt.value else Const(False)
        return Rt(f"and {wrap(lt.expr)} {wrap(rt.expr)}", "bool")

    def eval_Or(self, expr: nodes.Or) -> Any:
        left = self.eval(expr.left)
        lt = self.truth(left, expr.lineno)
        if isinstance(lt, Const):
            return left if lt.value else self.eval(expr.right)
        right = self.eval(expr.right)
        rt = self.truth(right, expr.lineno)
        if isinstance(rt, Const) and rt.value:
            return Const(True) if not isinstance(right, Const) or right.value is True else Rt(
                f"or {wrap(left.expr)} {go_literal(right.value, expr.lineno)}", left.kind)
        if isinstance(rt, Const):
            if left.kind == "str" and isinstance(right, Const) and right.value in ("", None, UNDEFINED):
                return Rt(f"or {wrap(left.expr)} \"\"", "str")
            if isinstance(right, Const) and right.value in ({}, [], None, UNDEFINED) and left.kind != "bool":
                return left  # `x or {}`: an empty value of x's own kind behaves the same
            return Rt(lt.expr, "bool")
        if left.kind == right.kind == "str":
            return Rt(f"or {wrap(left.expr)} {wrap(right.expr)}", "str")
        return Rt(f"or {wrap(lt.expr)} {wrap(rt.expr)}", "bool")

    def eval_CondExpr(self, expr: nodes.CondExpr) -> Any:
        test = self.truth(self.eval(expr.test), expr.lineno)
        if isinstance(test, Const):
            if test.value:
                return self.eval(expr.expr1)
            return self.eval(expr.expr2) if expr.expr2 is not None else Const(UNDEFINED)
        a = self.eval(expr.expr1)
        b = self.eval(expr.expr2) if expr.expr2 is not None else Const("")
        go = self.fresh("c")
        self.emit("{{ " + f"{go} := {as_go(b, expr.lineno)}" + " }}{{ if " + test.expr + " }}{{ "
                  + f"{go} = {as_go(a, expr.lineno)}" + " }}{{ end }}")
        return Rt(go, self.kind_of([a, b]))

    def eval_Concat(self, expr: nodes.Concat) -> Any:
        parts: tuple = ()
        for node in expr.nodes:
            value = self.eval(node)
            if isinstance(value, Rt) and value.kind not in ("str", "int", "any", "bool"):
                raise Unsupported(f"concatenating a {value.kind}", expr.lineno)
            parts += str_parts(value)
        return make_str(parts)

    def eval_Add(self, expr: nodes.Add) -> Any:
        left, right = self.eval(expr.left), self.eval(expr.right)
        if isinstance(left, Const) and isinstance(right, Const):
            try:
                return Const(left.value + right.value)
            except TypeError:
                if UNDEFINED in (left.value, right.value):
                    # Jinja raises here (such inputs are rejected there); print the defined side
                    return left if right.value is UNDEFINED else right
                raise Unsupported("adding incompatible constants", expr.lineno) from None
        kinds = {v.kind if isinstance(v, Rt) else "str" if isinstance(v.value, str) else type(v.value).__name__
                 for v in (left, right)}
        if kinds <= {"str"} and self.is_markup(left):
            # Markup + str escapes the str (markupsafe and Go's html escape the same five characters)
            import markupsafe

            escaped = tuple(markupsafe.escape(p) if isinstance(p, str) else Rt(f"html {wrap(p.expr)}", "str")
                            for p in str_parts(right))
            joined = make_str(tuple(str(p) if isinstance(p, str) else p for p in str_parts(left)) + escaped)
            return Const(markupsafe.Markup(joined.value)) if isinstance(joined, Const) else \
                Rt(joined.expr, "str", joined.parts, markup=True)
        if kinds <= {"str", "any"}:  # Jinja raises unless an "any" variable holds a string here
            return make_str(str_parts(left) + str_parts(right))
        if "acc" in kinds and all(isinstance(v, Rt) and v.kind == "acc" or isinstance(v, Const) and
                                  isinstance(v.value, list) for v in (left, right)):
            pieces = [Rt(v.expr, "str") if isinstance(v, Rt) else Const("".join(x + self.ACC_SEP for x in v.value))
                      for v in (left, right)]
            joined = make_str(str_parts(pieces[0]) + str_parts(pieces[1]))
            return Rt(joined.expr if isinstance(joined, Rt) else go_string(joined.value), "acc")
        if kinds <= {"int"}:
            return Rt(int_plus(as_go(left, expr.lineno), as_go(right, expr.lineno)), "int")
        if "str" in kinds and kinds <= {"str", "arguments", "tcfunction", "tool", "toolfunction", "parameters"}:
            # Jinja raises on str + mapping (such conversations fail there); Go prints the mapping as JSON
            self.notes.add("a mapping concatenated to a string is printed as JSON")
            as_json = [Rt(f"json {wrap(v.expr)}", "str") if isinstance(v, Rt) and v.kind != "str" else v
                       for v in (left, right)]
            return make_str(str_parts(as_json[0]) + str_parts(as_json[1]))
        raise Unsupported("arithmetic on runtime values", expr.lineno)

    @staticmethod
    def is_markup(value: Any) -> bool:
        import markupsafe

        return isinstance(value, Rt) and value.markup or isinstance(value, Const) and \
            isinstance(value.value, markupsafe.Markup)

    def eval_Sub(self, expr: nodes.Sub) -> Any:
        left, right = self.eval(expr.left), self.eval(expr.right)
        if isinstance(left, Const) and isinstance(right, Const):
            return Const(left.value - right.value)
        if all((isinstance(v, Rt) and v.kind == "int") or (isinstance(v, Const) and isinstance(v.value, int))
               for v in (left, right)):
            return Rt(int_minus(as_go(left, expr.lineno), as_go(right, expr.lineno)), "int")
        raise Unsupported("arithmetic on runtime values", expr.lineno)

    def _const_binop(self, expr: nodes.BinExpr, op: Any) -> Any:
        left, right = self.eval(expr.left), self.eval(expr.right)
        if isinstance(left, Const) and isinstance(right, Const):
            return Const(op(left.value, right.value))
        raise Unsupported(f"arithmetic ({type(expr).__name__}) on runtime values", expr.lineno)

    def eval_Mul(self, expr: nodes.Mul) -> Any:
        return self._const_binop(expr, lambda a, b: a * b)

    def eval_Mod(self, expr: nodes.Mod) -> Any:
        left, right = self.eval(expr.left), self.eval(expr.right)
        if isinstance(left, Rt) and left.kind == "int" and isinstance(right, Const) and right.value == 2:
            # parity from the last binary digit
            bits, parity = self.fresh("bits"), self.fresh("parity")
            self.emit("{{ " + f'{bits} := printf "%b" {wrap(left.expr)}' + " }}{{ " + f"{parity} := 0" + " }}{{ if "
                      + f'eq (slice {bits} ({int_minus(f"len {bits}", "1")})) "1"' + " }}{{ " + f"{parity} = 1"
                      + " }}{{ end }}")
            return Rt(parity, "int")
        return self._const_binop(expr, lambda a, b: a % b)

    def eval_Div(self, expr: nodes.Div) -> Any:
        return self._const_binop(expr, lambda a, b: a / b)

    def eval_FloorDiv(self, expr: nodes.FloorDiv) -> Any:
        return self._const_binop(expr, lambda a, b: a // b)

    def eval_Neg(self, expr: nodes.Neg) -> Any:
        value = self.eval(expr.node)
        if isinstance(value, Const):
            return Const(-value.value)
        raise Unsupported("negating a runtime value", expr.lineno)

    def eval_Compare(self, expr: nodes.Compare) -> Any:
        left = self.eval(expr.expr)
        result: Any = Const(True)
        for op in expr.ops:
            right = self.eval(op.expr)
            term = self.compare(left, op.op, right, expr.lineno)
            result = self.and_values(result, term)
            left = right
        return result

    @staticmethod
    def and_values(a: Any, b: Any) -> Any:
        if isinstance(a, Const):
            return b if a.value else a
        if isinstance(b, Const):
            return a if b.value else b
        return Rt(f"and {wrap(a.expr)} {wrap(b.expr)}", "bool")

    def compare(self, left: Any, op: str, right: Any, lineno: int | None) -> Any:
        import operator
        ops = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "gt": operator.gt, "lteq": operator.le,
               "gteq": operator.ge, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b}
        if isinstance(left, Const) and isinstance(right, Const):
            if op in ("in", "notin") and right.value in (UNDEFINED, None):
                return Const(op == "notin")
            try:
                return Const(ops[op](left.value, right.value))
            except TypeError:
                raise Unsupported(f"comparing {left.value!r} {op} {right.value!r}", lineno) from None
        if op in ("in", "notin"):
            value = self.contains(left, right, lineno)
            if op == "notin":
                return Const(not value.value) if isinstance(value, Const) else Rt(f"not {wrap(value.expr)}", "bool")
            return value
        for a, b in ((left, right), (right, left)):
            if isinstance(b, Const) and (b.value is None or b.value is UNDEFINED) and isinstance(a, Rt):
                # a runtime field compared with none: Ollama always has a value of the field's type
                if a.defined:
                    return Rt(f"not {wrap(a.defined)}", "bool") if op == "eq" else Rt(a.defined, "bool")
                return Const(op == "ne")
        for a, b in ((left, right), (right, left)):
            if isinstance(a, Rt) and a.kind == "any" and isinstance(b, Const) and \
                    isinstance(b.value, (str, bool, int)):
                # a variable holding values of several types: compare only when the Go types agree
                go_type = {bool: "bool", str: "string", int: "int"}[type(b.value)]
                same = f'and (eq (printf "%T" {a.expr}) "{go_type}") (eq {a.expr} {go_literal(b.value, lineno)})'
                if op == "eq":
                    return Rt(same, "bool")
                if op == "ne":
                    return Rt(f"not ({same})", "bool")
        if isinstance(left, Rt) and isinstance(right, Rt) and left.parts[:1] == right.parts[:1] == ("elem",) \
                and left.parts[1] == right.parts[1] and op in ("eq", "ne"):
            return Rt(f"{op} {left.parts[2]} {right.parts[2]}", "bool")
        if any(isinstance(v, Rt) and v.kind not in ("str", "int", "bool") for v in (left, right)):
            raise Unsupported(f"comparing a {left.kind if isinstance(left, Rt) else 'constant'} value", lineno)
        for v in (left, right):
            if isinstance(v, Const) and not isinstance(v.value, (str, int, bool)):
                raise Unsupported("comparing with a non-scalar constant", lineno)
        kinds = {v.kind if isinstance(v, Rt) else ("str" if isinstance(v.value, str) else "int")
                 for v in (left, right)}
        if len(kinds) > 1 and "bool" not in kinds:
            return Const(op == "ne")  # Jinja: a str never equals an int
        go_op = {"eq": "eq", "ne": "ne", "lt": "lt", "gt": "gt", "lteq": "le", "gteq": "ge"}[op]
        for a, b in ((left, right), (right, left)):
            if op in ("eq", "ne") and isinstance(a, Rt) and isinstance(b, Const) and b.value == "tool" \
                    and self.role_owner(a):
                test = self.role_test(a, ["tool"])
                return test if op == "eq" else Rt(f"not {wrap(test.expr)}", "bool")
        return Rt(f"{go_op} {wrap(as_go(left, lineno))} {wrap(as_go(right, lineno))}", "bool")

    @staticmethod
    def role_owner(role: Rt) -> str | None:
        """The message variable whose `.Role` this is (`$m` for `$m.Role`), if it is one."""
        match = re.fullmatch(r"(\$\w*)\.Role", role.expr)
        return match.group(1) if match else None

    def spelled_role(self, part: Rt) -> str:
        """A printed message role, with the tool role spelled out through `eq .Role "tool"` (Ollama's marker of
        a tool round trip) for templates that print roles generically and test for the tool role nowhere."""
        owner = self.role_owner(part)
        if owner is None:
            return part.expr
        go = self.fresh("role")
        self.emit("{{ " + f"{go} := {part.expr}" + " }}{{ with " + owner + ' }}{{ if eq .Role "tool" }}{{ '
                  + f'{go} = "tool"' + " }}{{ end }}{{ end }}")
        return go

    def role_test(self, role: Rt, roles: list[str]) -> Rt:
        """`role in roles` as a Go bool. A test for "tool" is written `eq .Role "tool"` with the message as dot:
        Ollama >= 0.30 looks for that literal text to decide that a Go template has a tool round trip, and
        otherwise prefers the GGUF's Jinja (see `ollama_round_trip`)."""
        owner = self.role_owner(role)
        if "tool" not in roles or owner is None:
            return Rt(f"eq {wrap(role.expr)} " + " ".join(go_string(r) for r in roles), "bool")
        ordered = ["tool"] + [r for r in roles if r != "tool"]
        go = self.fresh("isTool")
        self.emit("{{ " + f"{go} := false" + " }}{{ with " + owner + " }}{{ " + f"{go} = eq .Role "
                  + " ".join(go_string(r) for r in ordered) + " }}{{ end }}")
        return Rt(go, "bool")

    def contains(self, needle: Any, haystack: Any, lineno: int | None) -> Any:
        if isinstance(haystack, Rt) and haystack.kind == "acc" and (isinstance(needle, Rt) and needle.kind == "str"):
            found, k, s, item = self.fresh("found"), self.fresh("k"), self.fresh("s"), self.fresh("item")
            self.emit("{{ " + f"{found} := false" + " }}{{ " + f"{item} := printf \"%s%s%s\" {go_string(self.ACC_SEP)} "
                      f"{wrap(needle.expr)} {go_string(self.ACC_SEP)}" + " }}{{ " + f"{s} := printf \"%s%s\" "
                      f"{go_string(self.ACC_SEP)} {wrap(haystack.expr)}" + " }}{{ range " + f"{k} := len {s}"
                      + " }}{{ if " + f"and (not {found}) (le ({int_plus(k, f'len {item}')}) (len {s})) "
                      f"(eq (slice {s} {k} ({int_plus(k, f'len {item}')})) {item})" + " }}{{ " + f"{found} = true"
                      + " }}{{ end }}{{ end }}")
            return Rt(found, "bool")
        if isinstance(haystack, Rt) and haystack.kind in ("strlist", "list") and \
                (isinstance(needle, Rt) and needle.kind == "str" or isinstance(needle, Const)
                 and isinstance(needle.value, str)):
            found, item = self.fresh("found"), self.fresh("item")
            self.emit("{{ " + f"{found} := false" + " }}{{ range " + f"{item} := {haystack.expr}" + " }}{{ if "
                      + f"eq {item} {wrap(as_go(needle, lineno))}" + " }}{{ " + f"{found} = true"
                      + " }}{{ end }}{{ end }}")
            return Rt(found, "bool")
        if isinstance(haystack, Rt) and haystack.kind in ATTRS and haystack.kind != "message" and \
                isinstance(needle, Const) and isinstance(needle.value, str):
            if needle.value not in ATTRS[haystack.kind]:
                return Const(False)
            if (haystack.kind, needle.value) in ALWAYS_DEFINED:
                return Const(True)
            return self.truth(self.getattr(haystack, needle.value, lineno), lineno)
        if isinstance(haystack, Const) and isinstance(haystack.value, dict) and isinstance(needle, Rt):
            haystack = Const(list(haystack.value))  # membership in a mapping tests its keys
        if isinstance(haystack, Const) and isinstance(haystack.value, (list, tuple)) and isinstance(needle, Rt):
            if needle.kind not in ("str", "int"):
                raise Unsupported("`in` on a runtime value", lineno)
            if not haystack.value:
                return Const(False)
            if needle.kind == "str" and self.role_owner(needle) and "tool" in haystack.value \
                    and all(isinstance(v, str) for v in haystack.value):
                return self.role_test(needle, list(haystack.value))
            return Rt(f"eq {wrap(needle.expr)} " + " ".join(go_literal(v, lineno) for v in haystack.value), "bool")
        if isinstance(needle, Const) and isinstance(haystack, Rt):
            if haystack.kind == "message" and isinstance(needle.value, str):
                table = ATTRS["message"]
                if needle.value in ("role", "content"):
                    return Const(True)
                if needle.value in table:
                    return Rt(f"{wrap(haystack.expr)}.{table[needle.value][0]}", "bool")
                return Const(False)
            if self.closed_set(haystack) and isinstance(needle.value, str):
                return self.enumerate_roles(haystack, lambda role: needle.value in role)
            if haystack.kind == "str" and isinstance(needle.value, str) and any(t in needle.value for t in THINK_TAGS):
                self.notes.add("content never holds <think> tags in Ollama (thinking is separated into .Thinking)")
                return Const(False)
            if haystack.kind == "str" and isinstance(needle.value, str):
                return self.substring_test(haystack, needle.value)
            if haystack.kind == "any" and isinstance(needle.value, str):
                return self.untyped_contains(haystack, needle.value)
            if haystack.kind in ("arguments", "properties") and isinstance(needle.value, str):
                raise Unsupported("`in` on a runtime mapping", lineno)
        raise Unsupported("`in` on runtime strings (substring test)", lineno)

    def untyped_contains(self, haystack: Rt, needle: str) -> Rt:
        """`needle in x` for an untyped JSON value: a substring of a string, a key of an object, an item of an
        array (by its dynamic Go type)."""
        found, t, k, v = self.fresh("found"), self.fresh("t"), self.fresh("k"), self.fresh("v")
        x = wrap(haystack.expr)
        saved, self.out = self.out, []
        try:
            inner = self.substring_test(Rt(x, "str"), needle)
        finally:
            scan, self.out = "".join(self.out), saved
        lit = go_string(needle)
        self.emit("{{ " + f"{found} := false" + " }}{{ " + f'{t} := printf "%T" {x}' + " }}{{ if "
                  + f'eq {t} "string"' + " }}" + scan + "{{ " + f"{found} = {inner.expr}" + " }}{{ else if "
                  + f'eq {t} "map[string]interface {{}}"' + " }}{{ range " + f"{k}, {v} := {x}" + " }}{{ if "
                  + f"eq {k} {lit}" + " }}{{ " + f"{found} = true" + " }}{{ end }}{{ end }}{{ else if "
                  + f'eq {t} "[]interface {{}}"' + " }}{{ range " + f"{v} := {x}" + " }}{{ if "
                  + f'and (eq (printf "%T" {v}) "string") (eq (print {v}) {lit})' + " }}{{ " + f"{found} = true"
                  + " }}{{ end }}{{ end }}{{ end }}")
        return Rt(found, "bool")

    def min_max(self, values: list[Any], name: str, lineno: int | None) -> Any:
        """`[a, b, ...] | min` (or max) over ints, some known only at run time."""
        if not all(isinstance(v, Rt) and v.kind == "int" or isinstance(v, Const) and type(v.value) is int
                   for v in values):
            raise Unsupported(f"{name} of a list literal holding runtime values", lineno)
        if all(isinstance(v, Const) for v in values):
            return Const((min if name == "min" else max)(v.value for v in values))
        go = self.fresh(name)
        self.emit("{{ " + f"{go} := {as_go(values[0], lineno)}" + " }}")
        for v in values[1:]:
            self.emit("{{ if " + f"{'lt' if name == 'min' else 'gt'} {wrap(as_go(v, lineno))} {go}" + " }}{{ "
                      + f"{go} = {as_go(v, lineno)}" + " }}{{ end }}")
        return Rt(go, "int")

    def known_name(self, expr: nodes.Filter | nodes.Test) -> None:
        """An unknown filter or test (jinja2 defers those in conditional blocks to render time) is the template's
        mistake, not an untranslatable construct: say so in one line."""
        is_filter = isinstance(expr, nodes.Filter)
        if expr.name not in known_names()[0 if is_filter else 1]:
            message = f"No {'filter' if is_filter else 'test'} named '{expr.name}'."
            unknown_name_error(self.source, jinja2.TemplateAssertionError(message, expr.lineno))

    def eval_Test(self, expr: nodes.Test) -> Any:
        self.known_name(expr)
        value = self.eval(expr.node)
        name = expr.name
        args = [self.eval(a) for a in expr.args]
        if isinstance(value, Namespace):
            return Const(name == "defined")
        if isinstance(value, LoopInfo):
            return Const(name == "defined")
        if isinstance(value, Const):
            v = value.value
            table = {
                "defined": lambda: v is not UNDEFINED, "undefined": lambda: v is UNDEFINED,
                "none": lambda: v is None, "string": lambda: isinstance(v, str) and v is not UNDEFINED,
                "mapping": lambda: isinstance(v, dict), "number": lambda: isinstance(v, (int, float))
                and not isinstance(v, bool), "integer": lambda: isinstance(v, int) and not isinstance(v, bool),
                "boolean": lambda: isinstance(v, bool), "true": lambda: v is True, "false": lambda: v is False,
                "iterable": lambda: isinstance(v, (str, list, dict, tuple)),
                "sequence": lambda: isinstance(v, (str, list, tuple)),
                "equalto": lambda: v == args[0].value, "eq": lambda: v == args[0].value,
                "in": lambda: v in args[0].value,
            }
            if name not in table or any(isinstance(a, Rt) for a in args):
                raise Unsupported(f"test `is {name}`", expr.lineno)
            return Const(table[name]())
        kind = value.kind
        if name == "none" and value.defined is None and kind != "tools":
            return Const(False)  # an always-present Ollama field is never none
        if name in ("defined", "undefined", "none"):
            if value.defined is None:
                result: Any = Const(name == "defined")
            else:
                result = Rt(value.defined, "bool")
            if name in ("undefined", "none"):
                if name == "none" and value.defined and value.defined.startswith("$def_"):
                    return Rt(f"not {wrap(value.defined)}", "bool")  # a variable that may hold none
                if name == "none" and kind == "tools":
                    return Rt("not $.Tools", "bool")
                if name == "none" and value.defined is not None and kind == "bool":
                    return Rt(f"not {wrap(value.defined)}", "bool")
                if name == "none" and kind in ("str", "toolcalls", "int"):
                    return Const(False) if kind != "toolcalls" else Rt(f"not {wrap(value.expr)}", "bool")
                return Const(not result.value) if isinstance(result, Const) else Rt(f"not {wrap(result.expr)}", "bool")
            return result
        kind_tests = {"string": {"str"}, "mapping": {"arguments", "properties", "message", "tool", "toolcall",
                                                     "tcfunction", "toolfunction", "parameters", "property"},
                      "number": {"int"}, "integer": {"int"}, "boolean": {"bool"},
                      "iterable": {"str", "messages", "tools", "toolcalls", "strlist", "list", "arguments", "acc"},
                      "sequence": {"str", "messages", "tools", "toolcalls", "strlist", "list", "acc"}}
        if name in kind_tests and kind != "any":
            return Const(kind in kind_tests[name])
        go_types = {"string": ("string",), "boolean": ("bool",), "mapping": ("map[string]interface {}",),
                    "sequence": ("string", "[]interface {}"), "number": ("float64",),
                    "iterable": ("string", "[]interface {}", "map[string]interface {}")}
        if name in go_types and kind == "any":
            # JSON values decoded by Go: string, float64, bool, []interface {}, map[string]interface {}
            names = " ".join(go_string(t) for t in go_types[name])
            return Rt(f'eq (printf "%T" {wrap(value.expr)}) {names}', "bool")
        if name in ("true", "false") and kind == "bool":
            return Rt(value.expr if name == "true" else f"not {wrap(value.expr)}", "bool")
        if name in ("equalto", "eq", "==") and args:
            return self.compare(value, "eq", args[0], expr.lineno)
        if name in ("ne", "!="):
            return self.compare(value, "ne", args[0], expr.lineno)
        raise Unsupported(f"test `is {name}` on a runtime {kind}", expr.lineno)

    def eval_Filter(self, expr: nodes.Filter) -> Any:
        self.known_name(expr)
        if expr.name in ("min", "max") and isinstance(expr.node, nodes.List) and expr.node.items \
                and not expr.args and not expr.kwargs:
            return self.min_max([self.eval(item) for item in expr.node.items], expr.name, expr.lineno)
        value = self.eval(expr.node) if expr.node is not None else Const(UNDEFINED)
        args = [self.eval(a) for a in expr.args]
        kwargs = {k.key: self.eval(k.value) for k in expr.kwargs}
        name = expr.name
        if isinstance(value, Const) and all(isinstance(a, Const) for a in args + list(kwargs.values())):
            return self.const_filter(name, value.value, [a.value for a in args],
                                     {k: v.value for k, v in kwargs.items()}, expr.lineno)
        if isinstance(value, Namespace):
            raise Unsupported(f"filter {name} on a namespace", expr.lineno)
        return self.runtime_filter(name, value, args, kwargs, expr.lineno)

    def const_filter(self, name: str, value: Any, args: list, kwargs: dict, lineno: int | None) -> Const:
        from .jinja_render import make_environment

        env = make_environment()
        if name not in env.filters:
            raise LlmforgeError(f"chat template uses an unknown filter `{name}` at line {lineno}",
                                hint="fix the template or pass --chat-template NAME")
        if value is UNDEFINED:
            if name == "default":
                return Const(args[0] if args else "")
            if name in ("length", "count"):
                return Const(0)
            if name in ("trim", "string", "lower", "upper"):
                return Const("")
        try:
            result = env.call_filter(name, value, args, kwargs, context=env.from_string("").new_context())
        except Exception as exc:  # a constant that a filter rejects
            raise Unsupported(f"filter {name} on a constant ({exc})", lineno) from None
        if not isinstance(result, (str, int, float, bool, list, dict, tuple, type(None))):
            result = list(result)
        return Const(result)

    def runtime_filter(self, name: str, value: Any, args: list, kwargs: dict, lineno: int | None) -> Any:
        kind = value.kind if isinstance(value, Rt) else "const"
        if kind in ELEMENT_KIND and name in ('length', 'count', 'first', 'last') and value.parts[:1] == ("filter",):
            summary = self.filter_summary(value, lineno)
            if name in ("length", "count"):
                return Rt(summary["count"], "int")
            if name in ("first", "last"):
                return Rt(f"index {wrap(value.expr)} {summary[name]}", ELEMENT_KIND[kind],
                          ("elem", value.expr, summary[name]))
        if name in ("safe", "e", "escape") and kind == "str" and name == "safe":
            return value
        if name in ("upper", "lower", "title", "capitalize") and self.closed_set(value) and not args:
            return self.enumerate_roles(value, lambda v: getattr(v, name)())
        if name in ("trim", "strip") or (name == "string" and kind == "str"):
            if kind == "any":
                value = Rt(value.expr, "str")
                kind = "str"
            if kind != "str":
                raise Unsupported(f"filter {name} on a {kind}", lineno)
            return self.trim(value, lineno) if name in ("trim", "strip") else value
        if name in ("length", "count") and kind == "splitlist" and len(value.parts) == 2:
            return self.split_scan(value.parts[0], value.parts[1], None)
        if name in ("length", "count"):
            if kind in ("str", "messages", "tools", "toolcalls", "strlist", "list", "arguments", "properties"):
                return Rt(f"len {wrap(value.expr)}", "int")
            raise Unsupported(f"length of a {kind}", lineno)
        if name == "indent" and kind == "str" and value.expr.startswith("json ") and not args[1:] \
                and set(kwargs) <= {"width"}:
            # Go's encoder writes JSON on one line (a newline in a string is escaped), and indent without
            # first=True only indents after newlines: the identity
            return value
        if name == "tojson" and kind == "tcfunction":
            # Ollama's JSON of a call's function carries "index"; the OpenAI shape transformers sees does not
            e = wrap(value.expr)
            return Rt(f'printf "{{\\"name\\": %s, \\"arguments\\": %s}}" (json {e}.Name) (json {e}.Arguments)', "str")
        if name == "tojson" and kind in ("toolcalls", "toolcall"):
            return self.toolcalls_json(value, kind == "toolcall")
        if name == "tojson":
            if isinstance(value, Const):
                raise Unsupported("tojson of a mix of constants and runtime values", lineno)
            self.notes.add("JSON is printed by Go's encoder (key order/spacing differ; equal as parsed JSON)")
            return Rt(f"json {wrap(value.expr)}", "str")
        if name == "default":
            if isinstance(value, Const):
                return value if value.value is not UNDEFINED else args[0] if args else Const("")
            if value.defined and args and not (isinstance(args[0], Const) and args[0].value in ("", None)):
                go = self.fresh("d")
                self.emit("{{ " + f"{go} := {as_go(args[0], lineno)}" + " }}{{ if " + value.defined + " }}{{ "
                          + f"{go} = {value.expr}" + " }}{{ end }}")
                return Rt(go, value.kind)
            return value
        if name == "string" and kind in ("int", "any"):
            return Rt(f"print {wrap(value.expr)}", "str")
        if name in ("first", "last") and kind == "splitlist":
            if len(value.parts) == 1:
                return value.parts[0]
            return self.split_part(value.parts[0], value.parts[1], name == "last")
        if name == "first" and kind in ELEMENT_KIND:
            return Rt(f"index {wrap(value.expr)} 0", ELEMENT_KIND[kind])
        if name == "last" and kind in ELEMENT_KIND:
            return Rt(f"index {wrap(value.expr)} ({int_minus(f'len {wrap(value.expr)}', '1')})",
                      ELEMENT_KIND[kind])
        if name == "list" and kind in ELEMENT_KIND:
            return value
        if name == "replace" and kind == "str" and len(args) == 2 and isinstance(args[0], Const) and \
                isinstance(args[0].value, str) and args[0].value and not kwargs:
            return self.replace_scan(value, args[0].value, args[1])
        if name in ("lower", "upper") and kind in ("str", "any") and not args:
            text = value if kind == "str" else Rt(f"print {wrap(value.expr)}", "str")
            return self.case_scan(text, name == "upper")
        if name == "map" and kind in ("any", "strlist", "list") and len(args) == 1 and isinstance(args[0], Const) \
                and args[0].value in ("upper", "lower", "string", "trim") and not kwargs:
            # a mapped list of strings becomes a runtime string list (see ACC_SEP)
            acc, x = self.fresh("acc"), self.fresh("x")
            self.emit("{{ " + f'{acc} := ""' + " }}{{ range " + f"{x} := {wrap(value.expr)}" + " }}")
            item: Rt = Rt(f"print {x}", "str")
            if args[0].value in ("upper", "lower"):
                item = self.case_scan(item, args[0].value == "upper")
            self.emit("{{ " + f'{acc} = printf "%s%s%s" {acc} {wrap(item.expr)} {go_string(self.ACC_SEP)}'
                      + " }}{{ end }}")
            return Rt(acc, "acc")
        if name == "list" and kind == "acc":
            return value
        if name == "title" and kind == "str" and not args:
            return self.title_scan(value)
        if kind == "acc" and name == "join":
            sep = args[0] if args else Const("")
            if not isinstance(sep, Const):
                raise Unsupported("join with a runtime separator", lineno)
            joined = self.replace_scan(Rt(value.expr, "str"), self.ACC_SEP, sep)
            out = self.fresh("joined")
            n = str(len(sep.value.encode()))
            self.emit("{{ " + f'{out} := ""' + " }}{{ if " + joined.expr + " }}{{ "
                      + f"{out} = slice {joined.expr} 0 ({int_minus(f'len {joined.expr}', n)})" + " }}{{ end }}")
            return Rt(out, "str")
        if kind in ("list", "strlist") and name == "join":
            sep = args[0] if args else Const("")
            if not isinstance(sep, Const) or not isinstance(sep.value, str):
                raise Unsupported("join with a runtime separator", lineno)
            out, k, x = self.fresh("joined"), self.fresh("k"), self.fresh("x")
            self.emit("{{ " + f'{out} := ""' + " }}{{ range " + f"{k}, {x} := {wrap(value.expr)}" + " }}{{ if "
                      + k + " }}{{ " + f'{out} = printf "%s%s" {out} {go_string(sep.value)}' + " }}{{ end }}{{ "
                      + f'{out} = printf "%s%v" {out} {x}' + " }}{{ end }}")
            self.notes.add("runtime list items are joined with Go's formatting (strings and integers print alike)")
            return Rt(out, "str")
        if kind == "acc" and name in ("length", "count"):
            return self.count_scan(Rt(value.expr, "str"), self.ACC_SEP)
        if name in ("selectattr", "rejectattr") and kind == "str":
            return Const([])  # a string's characters have no attributes
        if name in ("selectattr", "rejectattr") and kind in ELEMENT_KIND and not value.parts \
                and all(isinstance(a, Const) for a in args):
            return Rt(value.expr, kind, ("filter", tuple(a.value for a in args), name == "rejectattr"))

        if name == "dictsort" and kind in ("arguments", "properties", "any") and not args and not kwargs:
            self.notes.add("dictsort: Go ranges over maps in sorted key order")
            return Rt(value.expr, "items", (kind,))
        if name == "items" and kind in ("arguments", "properties"):
            return Rt(value.expr, "items", (kind,))
        if name == "dictsort" and kind == "property" and not args and not kwargs:
            return Rt(value.expr, "structitems", (value,))
        raise Unsupported(f"filter `{name}` on a runtime {kind}", lineno)

    def toolcalls_json(self, value: Rt, single: bool) -> Rt:
        """Tool calls as OpenAI-shaped JSON ({id, type, function}); Ollama's own JSON has no "type"."""
        out, j, c = self.fresh("calls"), self.fresh("j"), self.fresh("call")
        one = ('printf "%s{\\"id\\": %s, \\"type\\": \\"function\\", \\"function\\": {\\"name\\": %s, '
               '\\"arguments\\": %s}}" ' + out + f" (json {c}.ID) (json {c}.Function.Name) (json {c}.Function.Arguments)")
        if single:
            self.emit("{{ " + f'{out} := ""' + " }}{{ " + f"{c} := {value.expr}" + " }}{{ " + f"{out} = {one}"
                      + " }}")
        else:
            self.emit("{{ " + f'{out} := "["' + " }}{{ range " + f"{j}, {c} := {value.expr}" + " }}{{ if " + j
                      + " }}{{ " + f'{out} = printf "%s, " {out}' + " }}{{ end }}{{ " + f"{out} = {one}"
                      + " }}{{ end }}{{ " + f'{out} = printf "%s]" {out}' + " }}")
        self.notes.add("tool calls printed as JSON are written field by field (Ollama's JSON has no \"type\")")
        return Rt(out, "str")

    def filter_predicate(self, value: Rt, item: str, lineno: int | None) -> str:
        _, args, reject = value.parts
        attr_value = self.getattr(Rt(item, ELEMENT_KIND[value.kind]), args[0], lineno)
        if len(args) == 1:
            test = self.truth(attr_value, lineno)
        elif args[1] in ("equalto", "eq", "==", "sameas"):
            test = self.compare(attr_value, "eq", Const(args[2]), lineno)
        elif args[1] in ("ne", "!="):
            test = self.compare(attr_value, "ne", Const(args[2]), lineno)
        elif args[1] in ("defined", "undefined", "none", "string"):
            test = self.eval_Test(nodes.Test(nodes.Name("\x00item", "load"), args[1], [], [], None, None,
                                             lineno=lineno)) if False else None
            raise Unsupported(f"selectattr test {args[1]}", lineno)
        else:
            raise Unsupported(f"selectattr test {args[1]}", lineno)
        if isinstance(test, Const):
            test = Rt("true" if test.value else "false", "bool")
        return f"not {wrap(test.expr)}" if reject else test.expr

    def filter_summary(self, value: Rt, lineno: int | None) -> dict[str, str]:
        """Count, first and last index of the items a selectattr/rejectattr keeps (one Go loop)."""
        count, first, last, k, x = (self.fresh(n) for n in ("count", "first", "last", "k", "x"))
        pred = self.filter_predicate(value, x, lineno)
        self.emit("{{ " + f"{count} := 0" + " }}{{ " + f"{first} := 0" + " }}{{ " + f"{last} := 0" + " }}"
                  + "{{ range " + f"{k}, {x} := {value.expr}" + " }}{{ if " + pred + " }}{{ if not " + count
                  + " }}{{ " + f"{first} = {k}" + " }}{{ end }}{{ " + f"{last} = {k}" + " }}{{ "
                  + f"{count} = {int_plus(count, '1')}" + " }}{{ end }}{{ end }}")
        return {"count": count, "first": first, "last": last}

    def trim(self, value: Any, lineno: int | None, chars: str | None = None, side: str = "both") -> Any:
        """Strip the literal ends; runtime pieces are taken as already trimmed (Ollama content)."""
        if isinstance(value, Const):
            return Const(value.value.strip(chars) if side == "both" else
                         value.value.lstrip(chars) if side == "left" else value.value.rstrip(chars))
        self.notes.add("trim/strip of content is the identity (content is assumed to have no outer whitespace)")
        parts = list(str_parts(value))
        if side in ("both", "left"):
            while parts and isinstance(parts[0], str):
                parts[0] = parts[0].lstrip(chars)
                if parts[0]:
                    break
                parts.pop(0)
        if side in ("both", "right"):
            while parts and isinstance(parts[-1], str):
                parts[-1] = parts[-1].rstrip(chars)
                if parts[-1]:
                    break
                parts.pop()
        return make_str(tuple(parts))

    def affix_test(self, text: Rt, affix: str, prefix: bool) -> Rt:
        """str.startswith/endswith with a literal: compare a byte slice, guarded by the length (`and` stops)."""
        n = str(len(affix.encode()))
        s = wrap(text.expr)
        part = f"slice {s} 0 {n}" if prefix else f"slice {s} ({int_minus(f'len {s}', n)})"
        return Rt(f"and (le {n} (len {s})) (eq ({part}) {go_string(affix)})", "bool")

    def split_part(self, text: Rt, sep: str, last: bool) -> Rt:
        """`text.split(sep)[0]` / `[-1]`: find the first/last occurrence by scanning byte offsets."""
        pos, k, s, res = self.fresh("pos"), self.fresh("k"), self.fresh("s"), self.fresh("part")
        n = str(len(sep.encode()))
        end = int_plus(k, n)
        first_only = "" if last else f"(lt {pos} 0) "
        self.emit("{{ " + f"{pos} := -1" + " }}{{ " + f"{s} := {text.expr}" + " }}{{ range " + f"{k} := len {s}"
                  + " }}{{ if " + f"and {first_only}(le ({end}) (len {s})) (eq (slice {s} {k} ({end})) "
                  + f"{go_string(sep)})" + " }}{{ " + f"{pos} = {k}" + " }}{{ end }}{{ end }}")
        cut = f"slice {s} ({int_plus(pos, n)})" if last else f"slice {s} 0 {pos}"
        self.emit("{{ " + f"{res} := {s}" + " }}{{ if ge " + pos + " 0 }}{{ " + f"{res} = {cut}" + " }}{{ end }}")
        return Rt(res, "str")

    def split_scan(self, text: Rt, sep: str, index: str | None) -> Rt:
        """`len(text.split(sep))` (index None) or `text.split(sep)[index]` for a runtime index >= 0: scan byte
        offsets for non-overlapping separators, as Python's split finds them."""
        s, k, p, start, nxt = (self.fresh(x) for x in ("s", "k", "p", "start", "next"))
        part, found = self.fresh("part"), self.fresh("found")
        n = str(len(sep.encode()))
        end = int_plus(k, n)
        take = "" if index is None else ("{{ if " + f"and (not {found}) (eq {p} {wrap(index)})" + " }}{{ "
                                         + f"{part} = slice {s} {start} {k}" + " }}{{ " + f"{found} = true"
                                         + " }}{{ end }}")
        self.emit("{{ " + f"{s} := {text.expr}" + " }}{{ " + f"{p} := 0" + " }}{{ " + f"{start} := 0" + " }}{{ "
                  + f"{nxt} := 0" + " }}{{ " + f'{part} := ""' + " }}{{ " + f"{found} := false" + " }}{{ range "
                  + f"{k} := len {s}" + " }}{{ if " + f"and (ge {k} {nxt}) (le ({end}) (len {s})) "
                  + f"(eq (slice {s} {k} ({end})) {go_string(sep)})" + " }}" + take + "{{ "
                  + f"{p} = {int_plus(p, '1')}" + " }}{{ " + f"{start} = {end}" + " }}{{ " + f"{nxt} = {end}"
                  + " }}{{ end }}{{ end }}")
        if index is None:
            return Rt(int_plus(p, "1"), "int")
        self.emit("{{ if " + f"and (not {found}) (eq {p} {wrap(index)})" + " }}{{ " + f"{part} = slice {s} {start}"
                  + " }}{{ end }}")
        return Rt(part, "str")

    def replace_scan(self, text: Rt, old: str, new: Any) -> Rt:
        """`text.replace(old, new)`, left to right without overlaps, by scanning byte offsets."""
        out, skip, k, s = self.fresh("out"), self.fresh("skip"), self.fresh("k"), self.fresh("s")
        n = len(old.encode())
        end = int_plus(k, str(n))
        new_expr = as_go(new, None)
        self.emit("{{ " + f'{out} := ""' + " }}{{ " + f"{skip} := 0" + " }}{{ " + f"{s} := {text.expr}" + " }}"
                  + "{{ range " + f"{k} := len {s}" + " }}{{ if " + skip + " }}{{ " + f"{skip} = {int_minus(skip, '1')}"
                  + " }}{{ else if " + f"and (le ({end}) (len {s})) (eq (slice {s} {k} ({end})) {go_string(old)})"
                  + " }}{{ " + f'{out} = printf "%s%s" {out} {wrap(new_expr)}' + " }}{{ " + f"{skip} = {n - 1}"
                  + " }}{{ else }}{{ " + f'{out} = printf "%s%s" {out} (slice {s} {k} ({int_plus(k, "1")}))'
                  + " }}{{ end }}{{ end }}")
        self.notes.add("str.replace/split on content are computed by scanning bytes")
        return Rt(out, "str")

    def case_scan(self, text: Rt, upper: bool) -> Rt:
        """str.lower/upper for ASCII letters (other characters pass through), byte by byte."""
        import string

        out, k, s, c = self.fresh("out"), self.fresh("k"), self.fresh("s"), self.fresh("c")
        src, dst = (string.ascii_lowercase, string.ascii_uppercase) if upper else \
            (string.ascii_uppercase, string.ascii_lowercase)
        chain = "".join(("{{ if " if i == 0 else "{{ else if ") + f'eq {c} "{a}"' + " }}{{ " + f'{c} = "{b}"' + " }}"
                        for i, (a, b) in enumerate(zip(src, dst)))
        self.emit("{{ " + f'{out} := ""' + " }}{{ " + f"{s} := {text.expr}" + " }}{{ range " + f"{k} := len {s}"
                  + " }}{{ " + f"{c} := slice {s} {k} ({int_plus(k, '1')})" + " }}" + chain + "{{ end }}{{ "
                  + f'{out} = printf "%s%s" {out} {c}' + " }}{{ end }}")
        self.notes.add("lower/upper of runtime text change ASCII letters only")
        return Rt(out, "str")

    def title_scan(self, text: Rt) -> Rt:
        """str.title for ASCII: a letter after a letter is lowered, any other letter raised."""
        import string

        out, k, s, c, prev, letter = (self.fresh(n) for n in ("out", "k", "s", "c", "prev", "letter"))
        branches = []
        for low, up in zip(string.ascii_lowercase, string.ascii_uppercase):
            branches.append((low, "{{ if not " + prev + " }}{{ " + f'{c} = "{up}"' + " }}{{ end }}"))
            branches.append((up, "{{ if " + prev + " }}{{ " + f'{c} = "{low}"' + " }}{{ end }}"))
        chain = "".join(("{{ if " if i == 0 else "{{ else if ") + f'eq {c} "{ch}"' + " }}{{ " + f"{letter} = true"
                        + " }}" + body for i, (ch, body) in enumerate(branches))
        self.emit("{{ " + f'{out} := ""' + " }}{{ " + f"{prev} := false" + " }}{{ " + f"{s} := {text.expr}"
                  + " }}{{ range " + f"{k} := len {s}" + " }}{{ " + f"{c} := slice {s} {k} ({int_plus(k, '1')})"
                  + " }}{{ " + f"{letter} := false" + " }}" + chain + "{{ end }}{{ " + f"{prev} = {letter}" + " }}{{ "
                  + f'{out} = printf "%s%s" {out} {c}' + " }}{{ end }}")
        self.notes.add("title() of runtime text handles ASCII letters only")
        return Rt(out, "str")

    def _scan_literal(self, text: Rt, needle: str, name: str, init: str, guard: str,
                      update: Callable[[str], str], kind: str) -> Rt:
        """Walk every byte offset of a runtime string (Go >= 1.22 ranges over an int); where ``needle`` starts
        (and ``guard`` holds, if given; ``{v}`` is the variable), set the result variable to ``update(var)``."""
        var, k, s = self.fresh(name), self.fresh("k"), self.fresh("s")
        end = int_plus(k, str(len(needle.encode())))
        cond = f"and {guard.format(v=var)} " if guard else "and "
        self.emit("{{ " + f"{var} := {init}" + " }}{{ " + f"{s} := {text.expr}" + " }}{{ range " + f"{k} := len {s}"
                  + " }}{{ if " + f"{cond}(le ({end}) (len {s})) (eq (slice {s} {k} ({end})) {go_string(needle)})"
                  + " }}{{ " + f"{var} = {update(var)}" + " }}{{ end }}{{ end }}")
        return Rt(var, kind)

    def count_scan(self, text: Rt, needle: str) -> Rt:
        """Occurrences of a literal (here: items of a runtime string list)."""
        return self._scan_literal(text, needle, "count", "0", "", lambda v: int_plus(v, "1"), "int")

    def substring_test(self, text: Rt, needle: str) -> Rt:
        """`needle in text`: scan every byte offset."""
        return self._scan_literal(text, needle, "found", "false", "(not {v})", lambda v: "true", "bool")

    ROLES = ("system", "user", "assistant", "tool")
    JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")

    def closed_set(self, value: Any) -> tuple[str, ...]:
        """The finite set of values a runtime string can take (message roles, JSON-schema types), if any."""
        if not isinstance(value, Rt) or value.kind != "str":
            return ()
        if value.expr.endswith(".Role"):
            return self.ROLES
        if value.expr.endswith(".Type"):  # also "print X.Type"
            return self.JSON_TYPES + ("function",)
        return ()

    def enumerate_roles(self, role: Rt, func: Any) -> Rt:
        """A string function of a role or schema type: those are closed sets, so tabulate it."""
        results = {r: func(r) for r in self.closed_set(role)}
        if all(isinstance(v, bool) for v in results.values()):
            true_roles = [r for r, v in results.items() if v]
            if not true_roles:
                return Const(False)
            return self.role_test(role, true_roles)
        go = self.fresh("r")
        chain = "".join(("{{ if " if i == 0 else "{{ else if ") + f"eq {wrap(role.expr)} {go_string(r)}" + " }}{{ "
                        + f"{go} = {go_literal(v, None)}" + " }}" for i, (r, v) in enumerate(results.items()))
        self.emit("{{ " + f"{go} := {role.expr}" + " }}" + chain + "{{ end }}")
        self.notes.add("string methods on roles are tabulated over Ollama's roles")
        return Rt(go, "str")

    def eval_Call(self, expr: nodes.Call) -> Any:
        if isinstance(expr.node, nodes.Name):
            name = expr.node.name
            target = self.env.get(name)
            if isinstance(target, Macro):
                return self.capture(lambda: self.inline_macro(target, expr))
            args = [self.eval(a) for a in expr.args]
            if name == "raise_exception":
                raise Unsupported("raise_exception used as a value", expr.lineno)
            if name == "strftime_now":
                fmt = args[0].value if args and isinstance(args[0], Const) else None
                if isinstance(fmt, str):
                    return self.strftime(fmt, expr.lineno)
                raise Unsupported(f"strftime_now({fmt!r}): Ollama's currentDate only gives YYYY-MM-DD", expr.lineno)
            if name == "range" and all(isinstance(a, Const) for a in args):
                return Const(list(range(*[a.value for a in args])))
            if name == "range" and len(args) == 1 and isinstance(args[0], Rt) and args[0].kind == "int":
                return Rt(args[0].expr, "intrange")
            if name == "range" and len(args) == 2 and all(isinstance(a, Rt) and a.kind == "int" or
                                                          isinstance(a, Const) and isinstance(a.value, int) and
                                                          a.value >= 0 for a in args):
                start, stop = (as_go(a, expr.lineno) for a in args)
                return Rt(int_minus(stop, start), "intrange", (start,))
            if name == "range" and len(args) == 3 and isinstance(args[0], Rt) and args[0].kind == "int" and \
                    all(isinstance(a, Const) and a.value == -1 for a in args[1:]):
                # range(n, -1, -1): n, n-1, ..., 0 (nothing when n < 0)
                return Rt(int_plus(args[0].expr, "1"), "intrange", ("rev", args[0].expr))
            if name == "dict":
                return self.eval_Dict(nodes.Dict([nodes.Pair(nodes.Const(k.key), k.value) for k in expr.kwargs],
                                                 lineno=expr.lineno))
            if name in ("namespace",):
                raise Unsupported("namespace() outside a set", expr.lineno)
            if name == "caller":
                raise Unsupported("caller() outside an inlined {% call %} block", expr.lineno)
            if name not in self.env and name not in ("range", "dict", "lipsum", "cycler", "joiner"):
                raise LlmforgeError(f"chat template calls an undefined function `{name}` at line {expr.lineno}",
                                    hint="fix the template or pass --chat-template NAME")
            raise Unsupported(f"call to {name}()", expr.lineno)
        callee = self.eval(expr.node)
        args = [self.eval(a) for a in expr.args]
        if isinstance(callee, Const) and isinstance(callee.value, tuple) and callee.value[:1] == ("method",):
            _, obj, method = callee.value
            if not all(isinstance(a, Const) for a in args):
                raise Unsupported(f"str.{method} with runtime arguments", expr.lineno)
            return Const(getattr(obj, method)(*[a.value for a in args]))
        if isinstance(callee, Rt) and callee.kind == "method":
            base, method = callee.parts
            if method in ("strip", "lstrip", "rstrip") and all(isinstance(a, Const) for a in args):
                side = {"strip": "both", "lstrip": "left", "rstrip": "right"}[method]
                return self.trim(base, expr.lineno, args[0].value if args else None, side)
            if method == "split" and args and isinstance(args[0], Const) and \
                    any(t in str(args[0].value) for t in THINK_TAGS):
                self.notes.add("content never holds <think> tags in Ollama (thinking is separated into .Thinking)")
                return Rt(base.expr, "splitlist", (base,))
            if method == "keys" and base.kind in ATTRS:
                self.notes.add(f"the keys of a {base.kind} are the fields Ollama's data model has")
                return Const([key for key in ATTRS[base.kind] if key not in ("reasoning", "thinking")])
            if method == "split" and len(args) == 1 and isinstance(args[0], Const) and isinstance(args[0].value, str) \
                    and args[0].value and base.kind == "str":
                return Rt(base.expr, "splitlist", (base, args[0].value))
            if method == "replace" and len(args) == 2 and isinstance(args[0], Const) and isinstance(args[0].value, str) \
                    and args[0].value and base.kind == "str" and (isinstance(args[1], Rt) and args[1].kind == "str"
                                                                   or isinstance(args[1].value if isinstance(args[1], Const) else None, str)):
                return self.replace_scan(base, args[0].value, args[1])
            if method == "items" and base.kind in ATTRS:
                # a struct's fields are known: unroll (JSON built from them compares as parsed JSON)
                pairs = [(key, self.getattr(base, key, expr.lineno)) for key in ATTRS[base.kind]
                         if key not in ("reasoning", "thinking")]
                return Const([(k, v) for k, v in pairs if not (isinstance(v, Const) and v.value is UNDEFINED)])
            if method == "items":
                return Rt(base.expr, "items", (base.kind,))
            if method == "get" and args and isinstance(args[0], Const):
                value = self.getattr(base, args[0].value, expr.lineno)
                if len(args) > 1 and isinstance(value, Rt) and value.defined:
                    go = self.fresh("g")
                    self.emit("{{ " + f"{go} := {as_go(args[1], expr.lineno)}" + " }}{{ if " + value.defined
                              + " }}{{ " + f"{go} = {value.expr}" + " }}{{ end }}")
                    return Rt(go, value.kind)
                if isinstance(value, Const) and value.value is UNDEFINED:
                    return args[1] if len(args) > 1 else Const(None)
                return value
            if method in ("startswith", "endswith") and len(args) == 1 and isinstance(args[0], Const) \
                    and isinstance(args[0].value, str):
                return self.affix_test(base, args[0].value, method == "startswith")
            if method in ("startswith", "endswith") and len(args) == 1 and isinstance(args[0], Rt) \
                    and args[0].kind == "str":
                a, t = wrap(args[0].expr), wrap(base.expr)
                part = f"slice {t} 0 (len {a})" if method == "startswith" else \
                    f"slice {t} ({int_minus(f'len {t}', f'len {a}')})"
                return Rt(f"and (le (len {a}) (len {t})) (eq ({part}) {a})", "bool")
            if self.closed_set(base) and all(isinstance(a, Const) for a in args):
                return self.enumerate_roles(base, lambda role: getattr(role, method)(*[a.value for a in args]))
            raise Unsupported(f"string method .{method}() on runtime content", expr.lineno)
        if isinstance(expr.node, nodes.Getattr) and expr.node.attr in ("append", "extend", "pop", "update",
                                                                        "insert", "clear", "remove"):
            # The sandbox refuses to mutate lists/dicts: Jinja fails on every input that reaches this
            # call, so those inputs do not apply; everything the Go template renders comes from elsewhere.
            self.notes.add(f"`.{expr.node.attr}()` is refused by transformers' sandbox; it is dropped")
            return Const(None)
        raise Unsupported("calling a runtime value", expr.lineno)


def _split_first_or_last(translator: _Translator) -> None:  # placeholder for clarity of the table below
    return None


def _patch_splitlist() -> None:
    """`content.split('</think>')[-1]` is the content itself once think tags are gone (see module doc)."""
    original = _Translator.eval_Getitem

    def eval_Getitem(self: _Translator, expr: nodes.Getitem) -> Any:
        base = self.eval(expr.node) if not isinstance(expr.arg, nodes.Slice) else None
        if isinstance(base, Rt) and base.kind == "splitlist":
            key = self.eval(expr.arg)
            if isinstance(key, Const) and key.value in (0, -1):
                if len(base.parts) == 1:
                    return base.parts[0]  # split on a think tag: content never holds one in Ollama
                return self.split_part(base.parts[0], base.parts[1], key.value == -1)
            if len(base.parts) == 2 and (isinstance(key, Rt) and key.kind == "int"
                                         or isinstance(key, Const) and isinstance(key.value, int) and key.value > 0):
                return self.split_scan(base.parts[0], base.parts[1], as_go(key, expr.lineno))
            raise Unsupported("indexing a split string", expr.lineno)
        return original(self, expr)

    _Translator.eval_Getitem = eval_Getitem


_patch_splitlist()

MAX_PASSES = 40


def translate_jinja(chat_template: str, special_tokens: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Translate, raising :class:`Unsupported` for constructs Go cannot express. Returns (go_template, notes)."""
    compile_template(chat_template)  # jinja2 finds unknown filters and tests only when compiling
    tree = parse_template(chat_template)
    forced: dict[str, str] = {}
    bos_loops: set[int] = set()
    spell_tool_role = False
    for _ in range(MAX_PASSES):
        translator = _Translator(dict(special_tokens or {}), forced, bos_loops, spell_tool_role)
        translator.source = chat_template
        try:
            go = translator.translate(tree)
        except _Restart:
            continue
        if not spell_tool_role and ".Tools" in go and ".ToolCalls" in go and not has_tool_round_trip(go):
            spell_tool_role = True  # once more, so that Ollama >= 0.30 sees the tool round trip it has
            continue
        return go, sorted(translator.notes)
    raise Unsupported("variables that change type across branches", None)


def translate_template(chat_template: str, special_tokens: dict[str, str] | None = None,
                       allow_fallback: bool = True) -> Translation:
    """Translate a Jinja chat template to an Ollama Go template; fall back to a named family template.

    Raises LlmforgeError for broken templates (syntax errors, undefined functions) and when no fallback fits.
    """
    try:
        go, notes = translate_jinja(chat_template, special_tokens)
        translation = Translation(go, notes=notes)
    except Unsupported as exc:
        problem = f"{exc.construct} at line {exc.lineno}" if exc.lineno else exc.construct
        if not allow_fallback:
            raise LlmforgeError(f"cannot translate the chat template: {problem}",
                                hint="pass --chat-template NAME to use a named template") from None
        from .named import closest_named_template, get_named_template

        name = closest_named_template(chat_template)
        go, notes = translate_jinja(get_named_template(name), special_tokens)
        translation = Translation(go, fallback=name, problems=[problem], notes=notes)
    translation.default_system = detect_default_system(chat_template, special_tokens)
    return translation


def detect_default_system(chat_template: str, special_tokens: dict[str, str] | None) -> str | None:
    """The system prompt a template injects when the conversation has none (Modelfile SYSTEM), if any."""
    from .jinja_render import render_jinja

    marker = "\x01SYSTEM\x01"
    user = {"role": "user", "content": "\x01USER\x01"}
    try:
        without = render_jinja(chat_template, [user], special_tokens=special_tokens)
        with_sys = render_jinja(chat_template, [{"role": "system", "content": marker}, user],
                                special_tokens=special_tokens)
    except LlmforgeError:
        return None
    prefix = 0
    while prefix < min(len(without), len(with_sys)) and without[prefix] == with_sys[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(without), len(with_sys)) - prefix and without[-1 - suffix] == with_sys[-1 - suffix]:
        suffix += 1
    a_mid = without[prefix:len(without) - suffix]
    b_mid = with_sys[prefix:len(with_sys) - suffix]
    if marker not in b_mid or not a_mid.strip():
        return None
    pre, post = b_mid.split(marker, 1)
    if a_mid.startswith(pre) and a_mid.endswith(post) and len(a_mid) > len(pre) + len(post):
        return a_mid[len(pre):len(a_mid) - len(post)] or None
    return None

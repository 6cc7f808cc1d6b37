"""The `math` reward's verifier: the final answer of a response (the last `\\boxed{...}`, else a
`#### x` line, else "the answer is x") checked against the reference with math-verify, which
parses LaTeX and plain expressions into sympy and compares them (fractions, decimals, sets).

Model text is hostile input: it is only scanned linearly and parsed, never evaluated; answers
longer than MAX_ANSWER_CHARS are wrong without parsing; and each check runs in a worker
process under a wall-clock deadline (math-verify's own timeouts are SIGALRM in whole seconds,
which cannot interrupt sympy inside C), so a pathological expression scores 0 within the
limit."""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
from typing import Optional

MAX_ANSWER_CHARS = 256  # longer "final answers" are not answers; never parse them
TIME_LIMIT_S = 1.0  # wall-clock limit of one check
STARTUP_LIMIT_S = 60.0  # the worker's start (imports sympy); not counted in a check's limit

_HASHES = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]{0,%d})$" % MAX_ANSWER_CHARS, re.MULTILINE)
_THE_ANSWER = re.compile(r"the (?:final )?answer is[:\s]*(\S[^\n]{0,%d})" % MAX_ANSWER_CHARS,
                         re.IGNORECASE)


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None
    when there is none or its braces never close. One linear scan from the last opening."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0 or text[start:brace].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for i in range(brace, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer a response states, as text; None when it states none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in (_HASHES, _THE_ANSWER):
        found = None
        for found in pattern.finditer(text):
            pass
        if found is not None:
            return found.group(1).strip().rstrip(".").strip().strip("$").strip()
    return None


def _parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    # math-verify finds expressions inside $...$ (LaTeX) or as plain text; its own alarm is off
    # (the worker's deadline bounds it)
    return parse(f"${text}$", configs, parsing_timeout=None) or parse(text, configs,
                                                                        parsing_timeout=None)


def _equal(candidate: str, reference: str) -> bool:
    from math_verify import verify
    try:
        gold, pred = _parse(reference), _parse(candidate)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - sympy/antlr failures on model text mean "not equal"
        return False


def _serve() -> None:
    """The worker's loop: one JSON [candidate, reference] per stdin line, "1"/"0" back."""
    import logging
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" notes
    _equal("1", "1")  # import and warm sympy before saying ready
    print("ready", flush=True)
    for line in sys.stdin:
        candidate, reference = json.loads(line)
        print(int(_equal(candidate, reference)), flush=True)


class _Worker:
    """A child process that runs math-verify; a check that outlives its deadline (sympy can
    spend unbounded time in C on `9^{999999999}`, where no signal reaches it) is killed with
    the process, and the next check starts a fresh one. The child runs this file alone (no
    torch, no package import) from "/"."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        code = f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='__serve__')"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, cwd="/", text=True, bufsize=1)
        if self._readline(proc, STARTUP_LIMIT_S) != "ready":
            self._kill(proc)
            raise RuntimeError("the math-verify worker did not start; check that "
                               "`python -c 'import math_verify'` works")
        atexit.register(self._kill, proc)
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen, seconds: float) -> Optional[str]:
        ready, _, _ = select.select([proc.stdout], [], [], seconds)
        return proc.stdout.readline().strip() if ready else None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def check(self, candidate: str, reference: str, seconds: float) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps([candidate, reference]) + "\n")
        self.proc.stdin.flush()
        answer = self._readline(self.proc, seconds)
        if answer is None:  # past the deadline: the check is wrong, the worker is dropped
            self._kill(self.proc)
            self.proc = None
            return False
        return answer == "1"


_WORKER = _Worker()


def answers_match(candidate: str, reference: str, time_limit_s: float = TIME_LIMIT_S) -> bool:
    """Whether two answer strings are mathematically equal (math-verify); False on a parse
    failure, an over-long answer or the deadline."""
    if not candidate or len(candidate) > MAX_ANSWER_CHARS:
        return False
    return _WORKER.check(candidate, str(reference), time_limit_s)


def math_correct(response: str, reference, time_limit_s: float = TIME_LIMIT_S) -> float:
    """1.0 when the response's final answer equals `reference`, else 0.0."""
    answer = extract_final_answer(response)
    return float(answer is not None and answers_match(answer, str(reference), time_limit_s))


if __name__ == "__serve__":
    _serve()

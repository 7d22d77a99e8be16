"""math-verify worker process (started by lad_jax.rewards.math.VerifierPool; trusted code on untrusted strings).

Protocol: JSON lines. Receives [item, answer, reference, inner_timeout_s]; replies [item, "ok"|"timeout"|"error",
bool]. Runs in its own process so math-verify's SIGALRM timeouts work (main thread) and a stuck sympy call can be
killed by the parent without harming anything else.
"""
import json
import resource
import sys

_MEMORY_BYTES = 4 << 30  # adversarial expressions (10^10^10) fail with MemoryError instead of swapping the host
_GOLD_CACHE: dict = {}


def _parse_gold(reference, inner_timeout):
    from math_verify import parse

    key = (reference, inner_timeout)
    if key not in _GOLD_CACHE:  # a reference is shared by the G completions of its prompt
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[key] = parse(f"${reference}$", parsing_timeout=inner_timeout)
    return _GOLD_CACHE[key]


def check(answer: str, reference: str, inner_timeout: int) -> bool:
    from math_verify import parse, verify

    gold = _parse_gold(reference, inner_timeout)
    pred = parse(f"${answer}$", parsing_timeout=inner_timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=inner_timeout))


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > _MEMORY_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_BYTES, hard))
    import math_verify  # noqa: F401 - pay the import before announcing readiness

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        item, answer, reference, inner = json.loads(line)
        try:
            reply = [item, "ok", check(answer, reference, inner)]
        except BaseException as e:  # noqa: BLE001 - any verifier failure is a counted 0
            reply = [item, "timeout" if type(e).__name__ == "TimeoutException" else "error", False]
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

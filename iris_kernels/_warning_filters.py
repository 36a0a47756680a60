"""The one warnings filter the library installs, when imported: numpy's ``overflow encountered
in …`` and ``invalid value encountered in …`` RuntimeWarnings raised by the Triton interpreter
(``TRITON_INTERPRET=1``, the CPU path of the Triton kernels), and nothing else.

Why they are expected: the interpreter runs every lane of a block in numpy, including the masked
lanes past the end of a row or of the vocabulary, whose loads return the ``other=`` fill (−inf for
logits) and whose results are discarded by the masked store; exp/multiply on those fills overflow
or produce NaN in lanes nobody reads. On a GPU the same lanes are computed silently. A NaN or inf
that does reach an output is propagated by the kernels (NaN in → NaN out), not hidden: this filter
only silences numpy's report, never changes a value.

The filter is scoped by ``module`` to warnings attributed to ``triton.runtime.interpreter``: the
same messages from any other module (this library's torch code, the user's) and any other message
from the interpreter (``divide by zero``, say) still show. pyproject.toml carries the same two
entries for pytest, which installs its own filters per test (tests/test_warning_filters.py).
"""
import warnings

INTERPRETER_MODULE = r"triton\.runtime\.interpreter"
EXPECTED_MESSAGES = ("overflow encountered in", "invalid value encountered in")


def install() -> None:
    for message in EXPECTED_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=RuntimeWarning, module=INTERPRETER_MODULE)


install()

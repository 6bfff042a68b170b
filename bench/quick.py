"""``python -m bench.quick``: P1-P3 on the embedded demo model (~30 s on two quiet cores; minutes when busy).

Same as ``python -m bench.run --quick``; extra arguments are passed through (e.g.
``--model bench``, ``--out FILE``). The last line printed is one JSON object with the
P1-P3 ratios.
"""

from __future__ import annotations

import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main(["--quick", *sys.argv[1:]]))

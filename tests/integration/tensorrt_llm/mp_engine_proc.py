"""A TRT-LLM engine process (the executor replay) using the ``lmcache-mp`` connector.

Usage: mp_engine_proc.py URL PROMPT_SEED PROMPT_LEN {exit|hang}. Prints the generated tokens, the
tokens the connector matched and a digest of the logits, then either exits or hangs (so a test can
SIGKILL it mid-run).
"""

import sys
import time

from support.e2e import MODEL, llm_args, logits_digest, prompt

from lmcache.testing.trtllm_replay import ReplayExecutor

url, seed, length, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = ReplayExecutor(llm_args("lmcache-mp", server_url=url), MODEL).generate([prompt(length, start=seed)], 4)[
    0
]
print(
    "TOKENS",
    " ".join(map(str, out.tokens)),
    "MATCHED",
    out.num_connector_matched_tokens,
    "LOGITS",
    logits_digest(out),
    flush=True,
)
if mode == "hang":
    time.sleep(3600)

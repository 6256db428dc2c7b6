"""The model worker: all of the model's arithmetic, none of the state's changing.

model.py       load the causal LM + tokenizer; geometry, RoPE, special ids, fingerprint
attention.py   sdpa that also returns the newest query's attention row
forward.py     read-only forwards over a replica's rows (prefill, step, compute_kv)
sampling.py    temperature / top-k / top-p / repetition penalty, seeded
calls.py       request validation + forward + sampling, as plain functions
limits.py      the size limits of every request field, the session and digest checks
tokens.py      Tokenize / Detokenize (special-token policy, token table)
repair.py      shared repair types; lm_repair.py and mlm_repair.py are the two policies
replica.py     replicas that change only by replaying the authority's Sync
servicer.py    proto <-> calls (convert.py), the one place errors become statuses
server.py      WorkerConfig and start_worker; main.py is `positronic worker`
"""

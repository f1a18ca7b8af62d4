"""How often a chat reply re-tokenises to the ids that were generated (text clients and prefix reuse).

A text client (the openai SDK) sends the next turn as text: the server renders the conversation with
the chat template and tokenises it again. Prefix reuse then covers the previous prompt, plus the reply
as far as its ids come back the same. For `--conversations` two-turn chats on an export (greedy,
sampled), this renders turn 2's prompt and reports how many of turn 1's prompt + reply ids it starts
with: the share of replies that come back whole, and the share of turn-2 prompt tokens a prefix match
on the previous slot's ids would serve.

    python benchmarks/retokenize_rate.py out/tiny-phi3 --conversations 100
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    import phi_onnx

    model = phi_onnx.load(args.folder, device="cpu", backend="ort")
    words = ["os.path.join", "json.loads", "the list", "a file", "itertools.chain", "sorted", "re.compile",
             "the dictionary", "threading.Lock", "pathlib.Path"]
    rng = np.random.default_rng(0)
    whole = served = total = 0
    for i in range(args.conversations):
        first = f"What does {words[i % len(words)]} do?"
        messages = [{"role": "user", "content": first}]
        prompt = model.chat_prompt_ids(messages)
        options = {"temperature": 0.8, "seed": i} if i % 2 else {}
        result = model.generate(prompt, max_new_tokens=args.max_new_tokens, **options)
        reply_ids = [t for t in result.token_ids if t not in model.eos_token_ids]
        held = prompt + reply_ids
        messages += [{"role": "assistant", "content": result.text},
                     {"role": "user", "content": f"And {words[int(rng.integers(len(words)))]}?"}]
        again = model.chat_prompt_ids(messages)
        same = 0
        while same < min(len(held), len(again)) and held[same] == again[same]:
            same += 1
        whole += same == len(held)
        served += same
        total += len(again)
    print(json.dumps({"conversations": args.conversations, "replies_back_whole": round(whole / args.conversations, 3),
                      "turn2_tokens_served_by_prefix": round(served / total, 3)}))


if __name__ == "__main__":
    main()

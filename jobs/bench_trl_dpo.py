"""TRL's DPOTrainer on the pairs jobs/bench_train.py exports: the peer the train benchmark runs beside ours.

Runs in .venv-trl (bash jobs/install_trl.sh), never in the pipeline's environment:

    .venv-trl/bin/python jobs/bench_trl_dpo.py --model M --pairs pairs.jsonl --steps 6 --batch 4 [--precompute]

On a GPU, beside jobs/bench_gpu.py (same ~1B Llama shape with random weights, the same synthetic token-id pairs,
bf16, the same micro-batch and accumulation), with TRL, datasets, dill and multiprocess carried as wheels:

    python jobs/bench_trl_dpo.py --gpu-like-bench-gpu --steps 5 --batch 8 --accumulation 4 [--precompute]

There TRL's tokenization is skipped (its `_prepare_dataset` passes the id pairs through), so both sides score the
same tokens.

Same precision as ours (fp32: DPOConfig's bf16 default is turned off), activation checkpointing off as ours (TRL
turns it on by default; --gradient-checkpointing for both sides' memory-saving setting), same pairs as text (TRL
tokenizes them to the same ids: the completions already end with the end-of-sequence token), same batch, β and learning rate, no
evaluation and no checkpoints. Prints one JSON line: seconds per step (each step timed by a callback), the time of
the reference pre-pass, the process's peak resident memory, the first step's loss, and with --precompute TRL's
reference log-probs of every pair, which bench_train.py compares with our reference stage's.
"""
import argparse
import json
import resource
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--tokenizer", help="where the model folder has none (its pad and end ids only)")
    parser.add_argument("--pairs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="TRL's default; off here unless given, as ours (train.activation_checkpointing)")
    parser.add_argument("--gpu-like-bench-gpu", action="store_true",
                        help="bench_gpu.py's model shape (random weights) and pairs, bf16 on the GPU")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (GPU mode)")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    gpu = args.gpu_like_bench_gpu
    if gpu:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_gpu import llama_config, synthetic_pairs

        config = llama_config(tiny=False)
        total = args.batch * args.accumulation * (args.steps + args.warmup)
        pairs = synthetic_pairs(total, 256, 256, config.vocab_size, seed=0)
        dataset = Dataset.from_list([{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"],
                                      "rejected_ids": p["rejected"]} for p in pairs])
        DPOTrainer._prepare_dataset = lambda self, data, *a, **k: data  # already token ids
        folder = tempfile.mkdtemp()
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        args.model = folder
    else:
        torch.set_num_threads(args.threads)
        rows = [json.loads(line) for line in open(args.pairs)]
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    precompute_seconds = []
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        started = time.perf_counter()
        out = original(self, *a, **k)
        precompute_seconds.append(time.perf_counter() - started)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds, self.logs, self.started = [], [], None

        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    steps = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps + (args.warmup if gpu else 0), learning_rate=args.learning_rate, beta=args.beta,
            bf16=gpu, fp16=False, use_cpu=not gpu, logging_steps=1, gradient_checkpointing=args.gradient_checkpointing,
            save_strategy="no", eval_strategy="no", report_to=[], seed=0,
            precompute_ref_log_probs=args.precompute, max_length=None, dataloader_num_workers=0,
            warmup_steps=0, lr_scheduler_type="constant", disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        started = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[steps])
        setup_seconds = time.perf_counter() - started
        trainer.train()
    if gpu:
        steps.seconds = steps.seconds[args.warmup:]
    result = {
        "trl_precompute": args.precompute,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": len(steps.seconds),
        "step_seconds": steps.seconds,
        "median_step_seconds": sorted(steps.seconds)[len(steps.seconds) // 2],
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "setup_seconds": setup_seconds,
        "precompute_seconds": sum(precompute_seconds) if precompute_seconds else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": next((log["loss"] for log in steps.logs if "loss" in log), None),
        "threads": torch.get_num_threads(),
    }
    if args.precompute and not gpu:
        result["ref_chosen_logps"] = list(map(float, trainer.train_dataset["ref_chosen_logps"]))
        result["ref_rejected_logps"] = list(map(float, trainer.train_dataset["ref_rejected_logps"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

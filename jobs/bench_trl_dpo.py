"""TRL's DPOTrainer on the pairs jobs/bench_train.py exports: the peer the train benchmark runs beside ours.

Runs in .venv-trl (bash jobs/install_trl.sh), never in the pipeline's environment:

    .venv-trl/bin/python jobs/bench_trl_dpo.py --model M --pairs pairs.jsonl --steps 6 --batch 4 [--precompute]

Same precision as ours (fp32: DPOConfig's bf16 default is turned off), same pairs as text (TRL tokenizes them to the
same ids: the completions already end with the end-of-sequence token), same batch, β and learning rate, no
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
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

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
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    steps = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.learning_rate, beta=args.beta, bf16=False, fp16=False,
            use_cpu=True, logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=0,
            precompute_ref_log_probs=args.precompute, max_length=None, dataloader_num_workers=0,
            warmup_steps=0, lr_scheduler_type="constant", disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        started = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[steps])
        setup_seconds = time.perf_counter() - started
        trainer.train()
    result = {
        "trl_precompute": args.precompute,
        "steps": len(steps.seconds),
        "step_seconds": steps.seconds,
        "setup_seconds": setup_seconds,
        "precompute_seconds": sum(precompute_seconds) if precompute_seconds else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": next((log["loss"] for log in steps.logs if "loss" in log), None),
        "threads": torch.get_num_threads(),
    }
    if args.precompute:
        result["ref_chosen_logps"] = list(map(float, trainer.train_dataset["ref_chosen_logps"]))
        result["ref_rejected_logps"] = list(map(float, trainer.train_dataset["ref_rejected_logps"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""vLLM's documented offline examples, run on the built-in model.

Each example is vLLM's own text (examples/offline_inference/basic/basic.py, basic/generate.py,
basic/chat.py and prefix_caching.py) with only the import and the model path changed, and a
small max_tokens where the example takes one; each then asserts what its output must be.
"""

from __future__ import annotations

from argparse import Namespace

import pytest
from transformers import AutoTokenizer

from runner import LLM, SamplingParams
from runner import demo
from runner.engine.outputs import CompletionOutput, RequestOutput

MODEL = demo.builtin_folder()
PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def _printed_pairs(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Prompt: ")]


def _assert_outputs(outputs, prompts, max_tokens: int) -> None:
    assert len(outputs) == len(prompts)
    for output, prompt in zip(outputs, prompts):
        assert isinstance(output, RequestOutput) and output.prompt == prompt
        assert output.finished and len(output.outputs) == 1
        completion = output.outputs[0]
        assert isinstance(completion, CompletionOutput)
        assert 1 <= len(completion.token_ids) <= max_tokens
        assert completion.finish_reason in ("stop", "length")
        if completion.finish_reason == "length":
            assert len(completion.token_ids) == max_tokens and completion.text  # no EOS: some text


# -- basic/basic.py ------------------------------------------------------------------------------

def test_basic(capsys):
    # Sample prompts.
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    # Create a sampling params object.
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

    # Create an LLM.
    llm = LLM(model=MODEL)
    # Generate texts from the prompts. The output is a list of RequestOutput objects
    # that contain the prompt, generated text, and other information.
    outputs = llm.generate(prompts, sampling_params)
    # Print the outputs.
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")

    _assert_outputs(outputs, prompts, max_tokens=16)  # vLLM's default max_tokens
    printed = _printed_pairs(capsys.readouterr().out)
    assert printed == [f"Prompt: {o.prompt!r}, Generated text: {o.outputs[0].text!r}" for o in outputs]
    for output in outputs:
        assert output.outputs[0].text == llm.get_tokenizer().decode(output.outputs[0].token_ids,
                                                                    skip_special_tokens=True)


# -- basic/generate.py ---------------------------------------------------------------------------

def generate_main(args: dict):
    # Pop arguments not used by LLM
    max_tokens = args.pop("max_tokens")
    temperature = args.pop("temperature")
    top_p = args.pop("top_p")
    top_k = args.pop("top_k")

    # Create an LLM
    llm = LLM(**args)

    # Create a sampling params object
    sampling_params = llm.get_default_sampling_params()
    if max_tokens is not None:
        sampling_params.max_tokens = max_tokens
    if temperature is not None:
        sampling_params.temperature = temperature
    if top_p is not None:
        sampling_params.top_p = top_p
    if top_k is not None:
        sampling_params.top_k = top_k

    # Generate texts from the prompts. The output is a list of RequestOutput
    # objects that contain the prompt, generated text, and other information.
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    outputs = llm.generate(prompts, sampling_params)
    # Print the outputs.
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
    return outputs, sampling_params  # for the assertions below


def test_generate_with_sampling_arguments(capsys):
    outputs, params = generate_main({"model": MODEL, "max_tokens": 6, "temperature": 0.0, "top_p": 0.9,
                                     "top_k": 20})
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (6, 0.0, 0.9, 20)
    _assert_outputs(outputs, PROMPTS, max_tokens=6)
    assert len(_printed_pairs(capsys.readouterr().out)) == 4
    # Greedy (temperature 0): the same call again gives the same tokens.
    again, _ = generate_main({"model": MODEL, "max_tokens": 6, "temperature": 0.0, "top_p": 0.9, "top_k": 20})
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]


def test_generate_with_the_defaults(capsys):
    outputs, params = generate_main({"model": MODEL, "max_tokens": None, "temperature": None, "top_p": None,
                                     "top_k": None})
    assert params == SamplingParams()  # the built-in folder has no generation_config.json
    _assert_outputs(outputs, PROMPTS, max_tokens=16)
    assert len(_printed_pairs(capsys.readouterr().out)) == 4


# -- basic/chat.py -------------------------------------------------------------------------------

def del_sampling_params_args(args: Namespace) -> Namespace:
    del args.max_tokens
    del args.temperature
    del args.top_p
    del args.top_k
    return args


def chat_main(args: Namespace):
    chat_template_path = args.chat_template_path
    del args.chat_template_path

    # Create a sampling params object.
    sampling_params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    args = del_sampling_params_args(args)

    # Create an LLM.
    llm = LLM(**vars(args))

    def print_outputs(outputs):
        for output in outputs:
            prompt = output.prompt
            generated_text = output.outputs[0].text
            print(f"Prompt: {prompt!r}")
            print(f"Generated text: {generated_text!r}")
        print("-" * 80)

    print("=" * 80)

    results = []  # for the assertions of the test
    # In this script, we demonstrate how to pass input to the chat method:
    conversation = [
        {
            "role": "system",
            "content": "You are a helpful assistant"
        },
        {
            "role": "user",
            "content": "Hello"
        },
        {
            "role": "assistant",
            "content": "Hello! How can I assist you today?"
        },
        {
            "role": "user",
            "content":
            "Write an essay about the importance of higher education.",
        },
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    print_outputs(outputs)
    results.append(outputs)

    # You can run batch inference with llm.chat API
    conversations = [conversation for _ in range(10)]

    # We turn on tqdm progress bar to verify it's indeed running batch inference
    outputs = llm.chat(conversations, sampling_params, use_tqdm=True)
    print_outputs(outputs)
    results.append(outputs)

    # A chat template can be optionally supplied.
    # If not, the model will use its default chat template.
    if chat_template_path:
        with open(chat_template_path) as f:
            chat_template = f.read()

        outputs = llm.chat(
            conversations,
            sampling_params,
            use_tqdm=False,
            chat_template=chat_template,
        )
        results.append(outputs)
    return conversation, results


CUSTOM_TEMPLATE = ("{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n"
                   "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat(tmp_path, capsys, hf_tokenizer):
    path = tmp_path / "template.jinja"
    path.write_text(CUSTOM_TEMPLATE)
    args = Namespace(model=MODEL, max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1,
                     chat_template_path=str(path))
    conversation, (single, batch, custom) = chat_main(args)

    expected = hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert expected.endswith("# assistant:\n")
    assert len(single) == 1 and single[0].prompt == expected
    assert single[0].prompt_token_ids == hf_tokenizer.encode(expected, add_special_tokens=False)
    _assert_outputs(single, [expected], max_tokens=4)
    _assert_outputs(batch, [expected] * 10, max_tokens=4)
    # Greedy: every copy of the conversation gets the same reply.
    assert {tuple(o.outputs[0].token_ids) for o in batch} == {tuple(single[0].outputs[0].token_ids)}

    rendered = hf_tokenizer.apply_chat_template(conversation, chat_template=CUSTOM_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    assert rendered.startswith("<system>You are a helpful assistant\n") and rendered.endswith("<assistant>")
    _assert_outputs(custom, [rendered] * 10, max_tokens=4)
    assert custom[0].prompt_token_ids == hf_tokenizer.encode(rendered, add_special_tokens=False)

    printed = capsys.readouterr().out
    assert printed.count("Prompt: ") == 11 and printed.count("Generated text: ") == 11
    assert printed.count("-" * 80) == 2


# -- prefix_caching.py ---------------------------------------------------------------------------

# Common prefix.
prefix = (
    "You are an expert school principal, skilled in effectively managing "
    "faculty and staff. Draft 10-15 questions for a potential first grade "
    "Head Teacher for my K-12, all-girls', independent school that emphasizes "
    "community, joyful discovery, and life-long learning. The candidate is "
    "coming in for a first-round panel interview for a 8th grade Math "
    "teaching role. They have 5 years of previous teaching experience "
    "as an assistant teacher at a co-ed, public school with experience "
    "in middle school math teaching. Based on these information, fulfill "
    "the following paragraph: "
)

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]

generating_prompts = [prefix + prompt for prompt in prompts]

# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.0, max_tokens=8)


def test_prefix_caching(capsys):
    # Create an LLM without prefix caching as a baseline.
    regular_llm = LLM(model=MODEL, enable_prefix_caching=False)

    print("Results without `enable_prefix_caching`")

    # Generate texts from the prompts. The output is a list of RequestOutput objects
    # that contain the prompt, generated text, and other information.
    outputs = regular_llm.generate(generating_prompts, sampling_params)

    regular_generated_texts = []
    # Print the outputs.
    print("-" * 50)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        regular_generated_texts.append(generated_text)
        print(f"Prompt: {prompt!r}\nGenerated text: {generated_text!r}")
        print("-" * 50)
    assert all(o.num_cached_tokens == 0 for o in outputs)  # no cache to read

    # Destroy the LLM object and free up the GPU memory.
    del regular_llm

    # Create an LLM with prefix caching enabled.
    prefix_cached_llm = LLM(model=MODEL, enable_prefix_caching=True, gpu_memory_utilization=0.4)

    # Warmup so that the shared prompt's KV cache is computed.
    prefix_cached_llm.generate(generating_prompts[0], sampling_params)

    # Generate with prefix caching.
    outputs = prefix_cached_llm.generate(generating_prompts, sampling_params)

    print("Results with `enable_prefix_caching`")

    cached_generated_texts = []
    # Print the outputs. You should see the same outputs as before.
    print("-" * 50)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        cached_generated_texts.append(generated_text)
        print(f"Prompt: {prompt!r}\nGenerated text: {generated_text!r}")
        print("-" * 50)

    # Compare the results and display the speedup
    generated_same = all(
        regular_generated_texts[i] == cached_generated_texts[i]
        for i in range(len(prompts))
    )
    print(f"Generated answers are the same: {generated_same}")

    assert generated_same and all(regular_generated_texts)
    assert cached_generated_texts == regular_generated_texts
    assert "Generated answers are the same: True" in capsys.readouterr().out
    # Every prompt shares the prefix the warm-up computed: whole blocks of it come from the cache.
    block = prefix_cached_llm.config.cache_config.block_size
    prefix_len = len(prefix_cached_llm.get_tokenizer().encode(prefix))
    for output in outputs:
        assert output.num_cached_tokens > 0 and output.num_cached_tokens % block == 0
        assert output.num_cached_tokens <= prefix_len + block  # the prefix, not a prompt's own tail
    assert outputs[0].num_cached_tokens >= (len(outputs[0].prompt_token_ids) - 1) // block * block

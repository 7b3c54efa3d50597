"""The chat templates a mergekit config can name (`chat_template: chatml`): mergekit 0.1.5 ships
alpaca, chatml, exaone, llama3 and mistral as Jinja files. fastmerge writes its own templates for
the same five formats, each rendering every conversation to the same text as mergekit's under
transformers' chat-template environment (blocks trimmed and left-stripped), whitespace quirks
included, and raising where it raises (tests/io/test_chat_templates.py renders both on the same
conversations). The stored text differs from mergekit's file; what a tokenizer renders does not.

Every template is written with explicit whitespace control ({%- ... -%}) and string literals, so
what it emits is exactly the quoted text."""

from __future__ import annotations

# <|im_start|>role, the content, <|im_end|>, one per message
CHATML = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# header, the content trimmed, <|eot_id|> and a newline per message; the BOS token before the first
LLAMA3 = (
    r"{%- for message in messages -%}"
    r"{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    r"{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' -}}"
    r"{{- message['content'] | trim -}}"
    r"{{- '<|eot_id|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

# [INST] blocks: an optional leading system message joins the first user turn; turns must
# alternate user / assistant
MISTRAL = (
    r"{%- set turns = messages -%}"
    r"{%- if messages[0]['role'] == 'system' -%}"
    r"{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    r"{%- endif -%}"
    r"{{- bos_token -}}"
    r"{%- for message in turns -%}"
    r"{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    r"{%- if message['role'] not in ('user', 'assistant') -%}"
    r"{{- raise_exception('mistral chat template: only user and assistant turns, after an optional system "
    r"message') -}}"
    r"{%- elif message['role'] != expected -%}"
    r"{{- raise_exception('mistral chat template: after an optional system message, turns must alternate "
    r"user / assistant') -}}"
    r"{%- endif -%}"
    r"{%- if message['role'] == 'user' -%}"
    r"{%- if loop.first and system is defined -%}"
    r"{{- ' [INST] ' ~ system ~ '\n\n' ~ message['content'] ~ ' [/INST]' -}}"
    r"{%- else -%}"
    r"{{- ' [INST] ' ~ message['content'] ~ ' [/INST]' -}}"
    r"{%- endif -%}"
    r"{%- else -%}"
    r"{{- ' ' ~ message['content'] ~ eos_token -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
)

# the last system message (trimmed) and a blank line, then "### Instruction/Response/Input:"
# sections separated by blank lines (none after the last; other roles write nothing)
ALPACA = (
    r"{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    r"{{- (systems | last).content | trim if systems else '' -}}"
    r"{{- '\n\n' -}}"
    r"{%- set headings = {'user': '### Instruction:\n', 'assistant': '### Response:\n',"
    r" 'user_context': '### Input:\n'} -%}"
    r"{%- for message in messages -%}"
    r"{%- if message['role'] in headings -%}"
    r"{{- headings[message['role']] ~ (message['content'] | trim) -}}"
    r"{%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\n' -}}{%- endif -%}"
)

# "[|role|]content" lines, an empty system turn first when the conversation has none; the
# indentation mergekit's file leaves in its output is part of the format it renders
EXAONE = (
    r"{%- for message in messages -%}"
    r"{%- if loop.first and message['role'] != 'system' -%}{{- '        [|system|][|endofturn|]\n\n' -}}{%- endif -%}"
    r"{{- '    [|' ~ message['role'] ~ '|]' ~ message['content'] ~ '\n' -}}"
    r"{%- if message['role'] == 'user' -%}{{- '        \n\n' -}}"
    r"{%- else -%}{{- '        [|endofturn|]\n\n' -}}{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '    [|assistant|]\n' -}}{%- endif -%}"
)

NAMED_TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}

// The official `openai` npm package against cb-proxy (run by tests/e2e/test_node_sdk.py).
//
// The SDK reads OPENAI_BASE_URL; the proxy sits in front of the demo's mock upstreams.
// Every step records what the app saw; the whole record is printed as one JSON object on
// stdout, and any failure is printed as {"error": ...} with a non-zero exit code.
import OpenAI from 'openai';

const client = new OpenAI({ apiKey: 'not-needed', maxRetries: 0 });
const hello = [{ role: 'user', content: 'Hello!' }];
const out = {};

function routeOf(response) {
  const headers = response.headers;
  return {
    route: headers.get('x-cb-route'),
    provider: headers.get('x-cb-provider'),
    upstream: headers.get('x-cb-upstream'),
  };
}

async function collect(stream) {
  let content = '';
  let chunks = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    chunks += 1;
    for (const choice of chunk.choices) {
      content += choice.delta?.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
    usage = chunk.usage ?? usage;
  }
  return { content, chunks, finish, usage };
}

// 1. A plain chat completion.
async function plain() {
  const reply = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: hello });
  const choice = reply.choices[0];
  return {
    object: reply.object,
    content: choice.message.content,
    finish: choice.finish_reason,
    usage: reply.usage,
  };
}

// 2. A stream, assembled by hand and by the SDK's stream helper.
async function streamed() {
  const stream = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages: hello,
    stream: true,
    stream_options: { include_usage: true },
  });
  const byHand = await collect(stream);
  const runner = client.chat.completions.stream({ model: 'gpt-4o-mini', messages: hello });
  const final = await runner.finalChatCompletion();
  return { ...byHand, helper: final.choices[0].message.content };
}

// 3. A tool call and its result, round trip.
async function tools() {
  const weather = {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'Weather for a city',
      parameters: {
        type: 'object',
        properties: { city: { type: 'string' } },
        required: ['city'],
        additionalProperties: false,
      },
    },
  };
  const messages = [{ role: 'user', content: 'Weather in Lisbon?' }];
  const first = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages,
    tools: [weather],
    tool_choice: 'required',
  });
  const message = first.choices[0].message;
  const call = message.tool_calls[0];
  const args = JSON.parse(call.function.arguments);
  messages.push(message, { role: 'tool', tool_call_id: call.id, content: '21 C, clear' });
  const second = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages,
    tools: [weather],
  });
  // The same round trip streamed: the SDK helper assembles the call's argument fragments.
  const runner = client.chat.completions.stream({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'Weather in Lisbon?' }],
    tools: [weather],
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
  });
  const streamedCall = (await runner.finalChatCompletion()).choices[0].message.tool_calls[0];
  return {
    first_finish: first.choices[0].finish_reason,
    name: call.function.name,
    args,
    second_finish: second.choices[0].finish_reason,
    second_content: second.choices[0].message.content,
    streamed_name: streamedCall.function.name,
    streamed_args: JSON.parse(streamedCall.function.arguments),
  };
}

// 4. The smart-routing guide's JavaScript, in this file's own words: a base URL swap and a
//    Claude model name, then the `circuit_breaker` extension in the request body.
async function guideBasic() {
  const { data, response } = await client.chat.completions
    .create({ model: 'claude-3-haiku-20240307', messages: hello })
    .withResponse();
  return { content: data.choices[0].message.content, ...routeOf(response) };
}

async function routed(content, preferences, model = 'auto') {
  const { data, response } = await client.chat.completions
    .create({ model, messages: [{ role: 'user', content }], circuit_breaker: preferences })
    .withResponse();
  return { content: data.choices[0].message.content, model: data.model, ...routeOf(response) };
}

async function guideStrategies() {
  const strategies = [
    'cost_optimized',
    'performance_first',
    'balanced',
    'reliability_first',
    'task_specific',
  ];
  const results = {};
  for (const routing_strategy of strategies) {
    results[routing_strategy] = await routed('Hello!', { routing_strategy });
  }
  results.coding = await routed('Write a function that adds two numbers', {
    routing_strategy: 'task_specific',
    task_type: 'coding',
  });
  results.capped = await routed('Explain AI', {
    routing_strategy: 'cost_optimized',
    max_cost_per_1k_tokens: 0.002,
  });
  results.virtual = await routed('Write a Python web scraper', {}, 'cb:coding');
  return results;
}

async function guideStreaming() {
  const { data: stream, response } = await client.chat.completions
    .create({
      model: 'auto',
      messages: [{ role: 'user', content: 'Tell me a story' }],
      stream: true,
      circuit_breaker: { routing_strategy: 'performance_first' },
    })
    .withResponse();
  return { ...(await collect(stream)), ...routeOf(response) };
}

// 5. An error the proxy gives: Claude returns one choice, so n=2 is a 400 naming `n`.
async function badRequest() {
  try {
    await client.chat.completions.create({ model: 'claude-3-5-haiku', messages: hello, n: 2 });
    return { status: 200 };
  } catch (err) {
    if (!(err instanceof OpenAI.APIError)) throw err;
    return { status: err.status, param: err.param ?? err.error?.param ?? null };
  }
}

try {
  out.node = process.version;
  out.sdk = OpenAI.VERSION ?? null;
  out.plain = await plain();
  out.stream = await streamed();
  out.tools = await tools();
  out.guide_basic = await guideBasic();
  out.guide_strategies = await guideStrategies();
  out.guide_stream = await guideStreaming();
  out.bad_request = await badRequest();
  process.stdout.write(JSON.stringify(out) + '\n');
} catch (err) {
  process.stdout.write(JSON.stringify({ error: String(err?.stack ?? err), partial: out }) + '\n');
  process.exitCode = 1;
}

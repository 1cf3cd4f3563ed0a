// The official Node SDK (npm `openai`) on the streamed OpenAI routes of a tokenfan API.
// Usage: node sdk_streams.cjs BASE_URL PROMPT MAX_TOKENS ROUTE[,ROUTE...]
// Prints one JSON object: what each route gave. Run by tests/nodesdk.py, with NODE_PATH set to the
// SDK's cache folder (outside the repository).
const OpenAI = require("openai");

const ROUTES = {
  async chat(client, prompt, maxTokens) {
    let text = "";
    let chunks = 0;
    const stream = await client.chat.completions.create({
      model: "smollm2", messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, stream: true,
    });
    for await (const c of stream) {
      chunks += 1;
      text += c.choices[0]?.delta?.content ?? "";
    }
    return { text, chunks };
  },

  async completions(client, prompt, maxTokens) {
    let text = "";
    const stream = await client.completions.create({ model: "smollm2", prompt, max_tokens: maxTokens, stream: true });
    for await (const c of stream) text += c.choices[0]?.text ?? "";
    return { text };
  },

  async responses(client, prompt, maxTokens) {
    let text = "";
    const types = [];
    const numbers = [];
    const stream = await client.responses.create({ model: "smollm2", input: prompt, max_output_tokens: maxTokens,
                                                   stream: true });
    for await (const e of stream) {
      types.push(e.type);
      numbers.push(e.sequence_number);
      if (e.type === "response.output_text.delta") text += e.delta;
    }
    return { text, types, numbers };
  },

  // responses.stream() rebuilds the response from the events: a snapshot that drops an item fails it.
  async responses_stream(client, prompt, maxTokens) {
    let text = "";
    const types = [];
    const stream = client.responses.stream({ model: "smollm2", input: prompt, max_output_tokens: maxTokens });
    stream.on("event", (e) => { types.push(e.type); });
    stream.on("response.output_text.delta", (e) => { text += e.delta; });
    const final = await stream.finalResponse();
    return { text, types, output_text: final.output_text, status: final.status, id: final.id };
  },

  // responses.stream() with a function tool the fake engine calls when the prompt names it.
  async responses_tools(client, prompt, maxTokens) {
    let args = "";
    const weather = { type: "object", properties: { city: { type: "string", minLength: 2 },
                                                    days: { type: "integer", minimum: 1 } },
                      required: ["city", "days"], additionalProperties: false };
    const stream = client.responses.stream({
      model: "smollm2", input: prompt, max_output_tokens: maxTokens,
      tools: [{ type: "function", name: "get_weather", description: "The forecast", parameters: weather }],
    });
    stream.on("response.function_call_arguments.delta", (e) => { args += e.delta; });
    const final = await stream.finalResponse();
    return { arguments: args, output: final.output, status: final.status };
  },

  // The same helper on a stored response, read from its start (PROMPT is the response's id).
  async retrieve_stream(client, id) {
    let text = "";
    const types = [];
    const stream = client.responses.stream({ response_id: id });
    stream.on("event", (e) => { types.push(e.type); });
    stream.on("response.output_text.delta", (e) => { text += e.delta; });
    const final = await stream.finalResponse();
    return { text, types, output_text: final.output_text, status: final.status, id: final.id };
  },
};

async function main() {
  const [base, prompt, maxTokens, routes] = process.argv.slice(2);
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
  const out = {};
  for (const name of routes.split(",")) out[name] = await ROUTES[name](client, prompt, Number(maxTokens));
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});

"""The OpenAI Agents SDK's default model (the Responses API) with a function tool, through a whole tool
round trip against real API and worker processes on the fake engine (issue 26): the model calls the
tool, the SDK runs it and sends its output back, and the answer goes on from the tool's result."""

from __future__ import annotations

import asyncio

import openai
from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from tests.procs import Cluster
from tokenfan.worker.engines import fake_tokens


def test_an_agent_runs_its_tool_and_answers_from_its_result(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker()
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    ran: list[str] = []

    @function_tool
    def get_time(zone: str) -> str:
        """The time now in a time zone."""
        ran.append(zone)
        return f"it is noon in {zone}"

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=30)
        try:
            agent = Agent(name="clock", instructions="Answer with the tool.", tools=[get_time],
                          model=OpenAIResponsesModel(model="smollm2", openai_client=client))
            result = await Runner.run(agent, "use get_time please", max_turns=3)
            return str(result.final_output)
        finally:
            await client.close()

    final = asyncio.run(run())
    assert len(ran) == 1  # the tool ran once, with the arguments the model wrote
    assert final.startswith("".join(fake_tokens([{"role": "tool", "content": f"it is noon in {ran[0]}"}], 3)))

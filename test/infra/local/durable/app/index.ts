// A small function app for the Durable extension test: registered through the real
// @azure/functions and durable-functions APIs, run by the local host.
import { app, type HttpRequest, type InvocationContext } from '@azure/functions';
import * as df from 'durable-functions';

const attempts = new Map<string, number>();

df.app.activity('greet', { handler: (name: string) => `hello ${name}` });

df.app.activity('flakyGreet', {
  handler: (key: string) => {
    const n = (attempts.get(key) ?? 0) + 1;
    attempts.set(key, n);
    if (n < 2) throw new Error(`attempt ${n} fails on purpose`);
    return `attempt ${n}`;
  },
});

df.app.activity('explode', {
  handler: () => {
    throw new Error('boom from an activity');
  },
});

df.app.orchestration('greeter', function* (context) {
  const names = context.df.getInput() as string[];
  const greetings = (yield context.df.Task.all(
    names.map((n) => context.df.callActivity('greet', n)),
  )) as string[];
  const flaky = yield context.df.callActivityWithRetry(
    'flakyGreet',
    new df.RetryOptions(50, 3),
    context.df.instanceId,
  );
  const child = yield context.df.callSubOrchestrator('childGreeter', 'child');
  return { greetings, flaky, child };
});

df.app.orchestration('childGreeter', function* (context) {
  return yield context.df.callActivity('greet', context.df.getInput() as string);
});

df.app.orchestration('exploder', function* (context) {
  yield context.df.callActivity('explode');
});

app.http('start', {
  route: 'start/{name}',
  methods: ['POST'],
  extraInputs: [df.input.durableClient()],
  handler: async (request: HttpRequest, context: InvocationContext) => {
    const client = df.getClient(context);
    const instanceId = await client.startNew(request.params.name, { input: await request.json() });
    return client.createCheckStatusResponse(request, instanceId);
  },
});

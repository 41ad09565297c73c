import { app, type HttpRequest, type HttpResponseInit } from '@azure/functions';
import { checkHealth } from '../../shared/health';

app.http('health', {
  route: 'health',
  methods: ['GET'],
  authLevel: 'anonymous',
  handler: async (_request: HttpRequest): Promise<HttpResponseInit> => {
    const report = await checkHealth(process.env);
    return { status: report.status === 'healthy' ? 200 : 503, jsonBody: report };
  },
});

import { BlobServiceClient } from '@azure/storage-blob';
import { describe, expect, inject, it } from 'vitest';

describe('embedded Azurite', () => {
  it('serves page blobs on the ports the global setup picked', async () => {
    const service = BlobServiceClient.fromConnectionString(inject('azuriteConnectionString'));
    const container = service.getContainerClient('smoke');
    await container.createIfNotExists();
    const page = container.getPageBlobClient('disk.img');
    await page.create(4096);
    const data = Buffer.alloc(512, 7);
    await page.uploadPages(data, 1024, 512);
    const read = await page.downloadToBuffer(1024, 512);
    expect(read.equals(data)).toBe(true);
  });
});

import type { AccessToken, TokenCredential } from '@azure/identity';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { randomUUID } from 'node:crypto';
import {
  AzureComputeProvider,
  azureNames,
  beginFailover,
  failoverDepsFromSettings,
  readRecord,
  type AzureTarget,
} from '../../../shared/failover';
import { createProtectionActivities, protectionDepsFromSettings } from '../../../shared/reprotect';
import { SEED_CONTAINER } from '../../../shared/replication';
import { StorageClients } from '../../../shared/storage';
import { startArmFake, type ArmFake } from '../../fixtures/arm-fake/server';
import { quietLogger, testSettings } from '../replication/helpers';

const sub = '00000000-0000-0000-0000-000000000001';
const rg = 'recovery-rg';
const vnetId = `/subscriptions/${sub}/resourceGroups/net-rg/providers/Microsoft.Network/virtualNetworks/recovery-vnet`;
const target: AzureTarget = {
  subscriptionId: sub,
  resourceGroup: rg,
  location: 'westeurope',
  subnetId: `${vnetId}/subnets/servers`,
  storageAccountId: `/subscriptions/${sub}/resourceGroups/lifeboat/providers/Microsoft.Storage/storageAccounts/lbreplica`,
  vmSize: 'Standard_D2s_v5',
  osType: 'Linux',
  testAddressPrefix: '10.250.0.0/24',
};

const credential: TokenCredential = {
  getToken: async (): Promise<AccessToken> => ({
    token: 'fake-token',
    expiresOnTimestamp: Date.now() + 3_600_000,
  }),
};

describe('the azure compute provider against the ARM fake', () => {
  let arm: ArmFake;
  let provider: AzureComputeProvider;
  const seed = StorageClients.fromConnectionString(inject('azuriteConnectionString'))
    .blobService()
    .getContainerClient(SEED_CONTAINER);

  beforeAll(async () => {
    arm = await startArmFake();
    arm.seed(vnetId, {
      type: 'Microsoft.Network/virtualNetworks',
      location: 'westeurope',
      properties: {
        subnets: [
          { name: 'servers', id: `${vnetId}/subnets/servers`, properties: { addressPrefix: '10.0.1.0/24' } },
        ],
      },
    });
    provider = new AzureComputeProvider({
      credential,
      seed,
      endpoint: arm.url,
      clientOptions: { tlsOptions: { ca: arm.ca } },
      pollMs: 10,
    });
  });
  afterAll(async () => arm?.close());

  const disks = [
    { id: 'os', sizeBytes: 64 * 1024 * 1024, snapshot: '2026-01-01T00:00:00.0000000Z' },
    { id: 'data', sizeBytes: 32 * 1024 * 1024, snapshot: '2026-01-01T00:00:00.0000000Z' },
  ];

  async function failOver(machine: string, failoverId: string, test: boolean) {
    const materialised = await Promise.all(
      disks.map((disk) => provider.materialiseDisk({ machine, failoverId, test, disk, target })),
    );
    return {
      materialised,
      vm: await provider.createTarget({
        machine,
        failoverId,
        test,
        pointId: 'm1',
        disks: materialised,
        target,
      }),
    };
  }

  it('failover: managed disks imported from the seed snapshots, a NIC in the target subnet, a VM attaching them; cleanup removes all of it', async () => {
    const { materialised, vm } = await failOver('web1', 'fo-aaaaaaaaaaaa', false);
    const names = azureNames('web1', 'fo-aaaaaaaaaaaa', false);
    const prefix = `/subscriptions/${sub}/resourceGroups/${rg}/providers`;
    expect(materialised.map((d) => d.resource)).toEqual([
      `${prefix}/Microsoft.Compute/disks/lb-fo-aaaaaaaaaaaa-os`,
      `${prefix}/Microsoft.Compute/disks/lb-fo-aaaaaaaaaaaa-data`,
    ]);
    const diskPut = arm.calls.find(
      (c) => c.method === 'PUT' && c.path.endsWith('/disks/lb-fo-aaaaaaaaaaaa-os'),
    )!;
    expect(diskPut.body.properties.creationData).toEqual({
      createOption: 'Import',
      sourceUri: `${seed.url}/web1/os.img?snapshot=${encodeURIComponent(disks[0].snapshot)}`,
      storageAccountId: target.storageAccountId,
    });
    expect(diskPut.body.tags).toMatchObject({ 'lifeboat-machine': 'web1', 'lifeboat-disk': 'os' });
    const nicPut = arm.calls.find(
      (c) => c.method === 'PUT' && c.path.endsWith(`/networkInterfaces/${names.nic}`),
    )!;
    expect(nicPut.body.properties.ipConfigurations[0].properties.subnet.id).toBe(target.subnetId);
    const vmPut = arm.calls.find((c) => c.method === 'PUT' && c.path.endsWith('/virtualMachines/web1'))!;
    expect(vmPut.body.properties.hardwareProfile).toEqual({ vmSize: 'Standard_D2s_v5' });
    expect(vmPut.body.properties.storageProfile.osDisk).toMatchObject({
      osType: 'Linux',
      createOption: 'Attach',
      managedDisk: { id: materialised[0].resource },
    });
    expect(vmPut.body.properties.storageProfile.dataDisks).toEqual([
      expect.objectContaining({
        lun: 0,
        createOption: 'Attach',
        managedDisk: expect.objectContaining({ id: materialised[1].resource }),
      }),
    ]);
    expect(vm).toMatchObject({
      name: 'web1',
      provider: 'azure',
      network: target.subnetId,
      test: false,
      running: true,
    });
    for (const c of arm.calls) expect(c.apiVersion, `${c.method} ${c.path}`).toMatch(/^\d{4}-\d{2}-\d{2}/);
    expect(arm.calls.every((c) => c.status < 300)).toBe(true);

    const deleted = await provider.cleanup({
      machine: 'web1',
      failoverId: 'fo-aaaaaaaaaaaa',
      test: false,
      diskIds: ['os', 'data'],
      target,
    });
    expect(deleted).toEqual([
      'virtualMachines/web1',
      `networkInterfaces/${names.nic}`,
      'disks/lb-fo-aaaaaaaaaaaa-os',
      'disks/lb-fo-aaaaaaaaaaaa-data',
    ]);
    expect([...arm.resources.keys()]).toEqual([vnetId.toLowerCase()]);
    // Cleanup again (a retried activity) is harmless.
    await provider.cleanup({
      machine: 'web1',
      failoverId: 'fo-aaaaaaaaaaaa',
      test: false,
      diskIds: ['os', 'data'],
      target,
    });
    expect(arm.calls.filter((c) => c.status >= 400)).toEqual([]);
  });

  it('test failover: its own isolated VNet and names; the production subnet is not touched', async () => {
    const before = arm.calls.length;
    const { vm } = await failOver('web1', 'fo-bbbbbbbbbbbb', true);
    const names = azureNames('web1', 'fo-bbbbbbbbbbbb', true);
    expect(vm.name).toBe(names.vm);
    expect(vm.name).not.toBe('web1');
    const calls = arm.calls.slice(before);
    const vnetPut = calls.find(
      (c) => c.method === 'PUT' && c.path.endsWith(`/virtualNetworks/${names.vnet}`),
    )!;
    expect(vnetPut.body.properties.addressSpace.addressPrefixes).toEqual(['10.250.0.0/24']);
    const nicPut = calls.find((c) => c.method === 'PUT' && c.path.includes('/networkInterfaces/'))!;
    expect(nicPut.body.properties.ipConfigurations[0].properties.subnet.id).toMatch(
      new RegExp(`/virtualNetworks/${names.vnet}/subnets/default$`),
    );
    expect(JSON.stringify(calls.map((c) => c.body))).not.toContain(target.subnetId);
    const deleted = await provider.cleanup({
      machine: 'web1',
      failoverId: 'fo-bbbbbbbbbbbb',
      test: true,
      diskIds: ['os', 'data'],
      target,
    });
    expect(deleted).toContain(`virtualNetworks/${names.vnet}`);
    expect([...arm.resources.keys()]).toEqual([vnetId.toLowerCase()]);
  });

  it("failback's stop step deallocates the VM (disks kept), and its stopped check then sees it deallocated", async () => {
    const machine = `app-${randomUUID().slice(0, 6)}`;
    const failoverId = 'fo-eeeeeeeeeeee';
    await failOver(machine, failoverId, false);
    const settings = testSettings(inject('azuriteConnectionString'), 'unused');
    const failover = failoverDepsFromSettings(settings, { compute: provider, log: quietLogger() });
    const activities = createProtectionActivities(
      protectionDepsFromSettings(settings, { failover, log: quietLogger() }),
    );
    await beginFailover(
      failover.tables,
      {
        machine,
        failoverId,
        operationId: failoverId,
        kind: 'unplanned',
        selector: 'latest-processed',
        target,
      },
      new Date(),
    );
    const ref = { machine, failoverId };
    expect(await activities.failoverMachineStopped(ref)).toBe(false);
    const before = arm.calls.length;
    await activities.stopFailoverMachine(ref);
    const vmPath = `/subscriptions/${sub}/resourceGroups/${rg}/providers/Microsoft.Compute/virtualMachines/${machine}`;
    expect(arm.calls.slice(before).map((c) => [c.method, c.path, c.status])).toEqual([
      ['POST', `${vmPath}/deallocate`, 200],
    ]);
    expect(arm.resources.get(vmPath.toLowerCase()).powerState).toBe('deallocated');
    // The next step of the failback (waiting until the machine is stopped) goes on at once.
    expect(await activities.failoverMachineStopped(ref)).toBe(true);
    expect((await readRecord(failover.tables, machine, failoverId))?.state).toBe('failing-back');
    const names = azureNames(machine, failoverId, false, 'os');
    expect(
      arm.resources.has(
        `/subscriptions/${sub}/resourceGroups/${rg}/providers/Microsoft.Compute/disks/${names.disk}`.toLowerCase(),
      ),
    ).toBe(true);
    // Stopping again (a retried activity) is harmless.
    await activities.stopFailoverMachine(ref);
    expect(arm.calls.filter((c) => c.status >= 400)).toEqual([]);
    await provider.cleanup({ machine, failoverId, test: false, diskIds: ['os', 'data'], target });
  });

  it('fails with a message naming "target" when the request has none', async () => {
    await expect(
      provider.materialiseDisk({
        machine: 'web1',
        failoverId: 'fo-cccccccccccc',
        test: false,
        disk: disks[0],
      }),
    ).rejects.toMatchObject({
      status: 400,
      target: 'target',
    });
  });

  it('the fake refuses what ARM refuses: a VM over a disk that does not exist', async () => {
    await expect(
      provider.createTarget({
        machine: 'web2',
        failoverId: 'fo-dddddddddddd',
        test: false,
        pointId: 'm1',
        disks: [
          {
            id: 'os',
            sizeBytes: 1,
            snapshot: 's',
            resource: `/subscriptions/${sub}/resourceGroups/${rg}/providers/Microsoft.Compute/disks/missing`,
          },
        ],
        target,
      }),
    ).rejects.toThrow(/does not exist/);
  });
});

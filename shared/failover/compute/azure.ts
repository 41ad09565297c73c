import type { TokenCredential } from '@azure/identity';
import { ComputeManagementClient } from '@azure/arm-compute';
import { NetworkManagementClient } from '@azure/arm-network';
import type { ContainerClient } from '@azure/storage-blob';
import { ValidationError } from '../../errors';
import { seedBlob, statusOf } from '../../replication';
import type { AzureTarget, MaterialisedDisk, TargetMachine } from '../model';
import {
  targetName,
  type CleanupRequest,
  type ComputeProvider,
  type CreateTargetRequest,
  type MaterialiseRequest,
  type StopRequest,
} from './port';

export interface AzureComputeDeps {
  credential: TokenCredential;
  /** `seed-disks`: managed disks are imported from its snapshots' URLs. */
  seed: ContainerClient;
  /** Resource Manager endpoint (the ARM fake in tests). */
  endpoint?: string;
  /** Extra pipeline options (tests pass the fake's CA through `tlsOptions`). */
  clientOptions?: { tlsOptions?: { ca?: string | Buffer } };
  /** LRO poll interval (ms). */
  pollMs?: number;
}

/** Azure resource names a failover creates: all derive from the failover id. */
export function azureNames(machine: string, failoverId: string, test: boolean, diskId?: string) {
  const base = `lb-${failoverId}`;
  return {
    vm: targetName(machine, failoverId, test),
    nic: `${base}-nic`,
    disk: diskId === undefined ? '' : `${base}-${diskId}`,
    vnet: `${base}-isolated`,
  };
}

function requireTarget(target: AzureTarget | undefined): AzureTarget {
  if (!target) {
    throw new ValidationError(
      'The azure compute provider needs "target" ({ subscriptionId, resourceGroup, location, subnetId, storageAccountId, vmSize }) in the failover request or the plan.',
      'target',
    );
  }
  return target;
}

/**
 * The `azure` compute provider: a managed disk per protected disk, imported from the seed
 * blob's snapshot URL; a NIC in the target subnet (a drill gets its own isolated VNet); a VM that
 * attaches the disks (the first is the OS disk). Not yet exercised against real Azure: it is
 * tested against test/fixtures/arm-fake, which checks the request shapes (docs/failover.md).
 */
export class AzureComputeProvider implements ComputeProvider {
  readonly kind = 'azure' as const;

  constructor(private readonly deps: AzureComputeDeps) {}

  private options() {
    const endpoint = this.deps.endpoint ?? 'https://management.azure.com';
    return {
      endpoint,
      $host: endpoint,
      credentialScopes: ['https://management.azure.com/.default'],
      ...this.deps.clientOptions,
    };
  }

  private compute(target: AzureTarget) {
    return new ComputeManagementClient(this.deps.credential, target.subscriptionId, this.options());
  }

  private network(target: AzureTarget) {
    return new NetworkManagementClient(this.deps.credential, target.subscriptionId, this.options());
  }

  private get lro() {
    return { updateIntervalInMs: this.deps.pollMs ?? 2000 };
  }

  async materialiseDisk(request: MaterialiseRequest): Promise<MaterialisedDisk> {
    const target = requireTarget(request.target);
    const { machine, failoverId, disk, test } = request;
    const sourceUri = seedBlob(this.deps.seed, machine, disk.id).withSnapshot(disk.snapshot).url;
    const name = azureNames(machine, failoverId, test, disk.id).disk;
    const created = await this.compute(target).disks.beginCreateOrUpdateAndWait(
      target.resourceGroup,
      name,
      {
        location: target.location,
        sku: { name: 'Premium_LRS' },
        creationData: { createOption: 'Import', sourceUri, storageAccountId: target.storageAccountId },
        tags: { 'lifeboat-machine': machine, 'lifeboat-failover': failoverId, 'lifeboat-disk': disk.id },
      },
      this.lro,
    );
    return { id: disk.id, sizeBytes: disk.sizeBytes, snapshot: disk.snapshot, resource: created.id ?? name };
  }

  async createTarget(request: CreateTargetRequest): Promise<TargetMachine> {
    const target = requireTarget(request.target);
    const { machine, failoverId, test } = request;
    const names = azureNames(machine, failoverId, test);
    const tags = { 'lifeboat-machine': machine, 'lifeboat-failover': failoverId };
    const network = this.network(target);
    let subnetId = target.subnetId;
    if (test) {
      const vnet = await network.virtualNetworks.beginCreateOrUpdateAndWait(
        target.resourceGroup,
        names.vnet,
        {
          location: target.location,
          addressSpace: { addressPrefixes: [target.testAddressPrefix] },
          subnets: [{ name: 'default', addressPrefix: target.testAddressPrefix }],
          tags,
        },
        this.lro,
      );
      subnetId = vnet.subnets?.[0]?.id ?? `${vnet.id}/subnets/default`;
    }
    const nic = await network.networkInterfaces.beginCreateOrUpdateAndWait(
      target.resourceGroup,
      names.nic,
      {
        location: target.location,
        ipConfigurations: [
          { name: 'ipconfig1', subnet: { id: subnetId }, privateIPAllocationMethod: 'Dynamic' },
        ],
        tags,
      },
      this.lro,
    );
    const [os, ...data] = request.disks;
    const vm = await this.compute(target).virtualMachines.beginCreateOrUpdateAndWait(
      target.resourceGroup,
      names.vm,
      {
        location: target.location,
        hardwareProfile: { vmSize: target.vmSize },
        storageProfile: {
          osDisk: { osType: target.osType, createOption: 'Attach', managedDisk: { id: os.resource } },
          dataDisks: data.map((d, lun) => ({ lun, createOption: 'Attach', managedDisk: { id: d.resource } })),
        },
        networkProfile: { networkInterfaces: [{ id: nic.id!, primary: true }] },
        tags,
      },
      this.lro,
    );
    return {
      name: names.vm,
      provider: 'azure',
      resource: vm.id ?? names.vm,
      network: test ? names.vnet : target.subnetId,
      running: true,
      test,
      disks: request.disks,
    };
  }

  /** Deallocates the VM (failback): it stops and releases its compute; its disks stay. */
  async stopTarget(request: StopRequest): Promise<void> {
    const target = requireTarget(request.target);
    const vm = azureNames(request.machine, request.failoverId, request.test).vm;
    try {
      await this.compute(target).virtualMachines.beginDeallocateAndWait(target.resourceGroup, vm, this.lro);
    } catch (err) {
      if (statusOf(err) !== 404) throw err; // gone: nothing writes to the disks
    }
  }

  /** Deallocated (its instance view's power state) or gone. */
  async targetStopped(request: StopRequest): Promise<boolean> {
    const target = requireTarget(request.target);
    const vm = azureNames(request.machine, request.failoverId, request.test).vm;
    try {
      const view = await this.compute(target).virtualMachines.instanceView(target.resourceGroup, vm);
      return (view.statuses ?? []).some((s) => s.code === 'PowerState/deallocated');
    } catch (err) {
      if (statusOf(err) === 404) return true;
      throw err;
    }
  }

  async cleanup(request: CleanupRequest): Promise<string[]> {
    if (!request.target) return [];
    const target = request.target;
    const { machine, failoverId, test } = request;
    const names = azureNames(machine, failoverId, test);
    const compute = this.compute(target);
    const network = this.network(target);
    const deleted: string[] = [];
    const remove = async (what: string, run: () => Promise<void>) => {
      try {
        await run();
        deleted.push(what);
      } catch (err) {
        if (statusOf(err) !== 404) throw err;
      }
    };
    // A disk cannot go while a VM holds it, nor a subnet while a NIC is in it: VM, NIC, disks, VNet.
    await remove(`virtualMachines/${names.vm}`, () =>
      compute.virtualMachines.beginDeleteAndWait(target.resourceGroup, names.vm, this.lro),
    );
    await remove(`networkInterfaces/${names.nic}`, () =>
      network.networkInterfaces.beginDeleteAndWait(target.resourceGroup, names.nic, this.lro),
    );
    for (const diskId of request.diskIds) {
      const disk = azureNames(machine, failoverId, test, diskId).disk;
      await remove(`disks/${disk}`, () =>
        compute.disks.beginDeleteAndWait(target.resourceGroup, disk, this.lro),
      );
    }
    if (test) {
      await remove(`virtualNetworks/${names.vnet}`, () =>
        network.virtualNetworks.beginDeleteAndWait(target.resourceGroup, names.vnet, this.lro),
      );
    }
    return deleted;
  }
}

import net from 'node:net';

/*
 * A small NBD client (fixed newstyle handshake, NBD_OPT_GO, one request at a time) so the demo
 * can write through the agent's export on machines without libnbd or qemu. Tests use the real
 * clients; this one only has to be correct, not fast.
 */

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const INFO_EXPORT = 0;
const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;
const CMD = { read: 0, write: 1, disc: 2, flush: 3, trim: 4, writeZeroes: 6 } as const;

class Reader {
  private buffered = Buffer.alloc(0);
  private waiting?: { bytes: number; resolve: (b: Buffer) => void; reject: (e: Error) => void };
  private failure?: Error;

  constructor(socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk]);
      this.pump();
    });
    const fail = (err: Error) => {
      this.failure = err;
      this.waiting?.reject(err);
      this.waiting = undefined;
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('The NBD server closed the connection.')));
  }

  read(bytes: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting = { bytes, resolve, reject };
      this.pump();
    });
  }

  private pump(): void {
    if (!this.waiting || this.buffered.length < this.waiting.bytes) return;
    const { bytes, resolve } = this.waiting;
    this.waiting = undefined;
    const out = this.buffered.subarray(0, bytes);
    this.buffered = this.buffered.subarray(bytes);
    resolve(Buffer.from(out));
  }
}

export class NbdClient {
  private handle = 0n;

  private constructor(
    private readonly socket: net.Socket,
    private readonly reader: Reader,
    readonly size: number,
  ) {}

  static async connect(host: string, port: number, exportName: string): Promise<NbdClient> {
    const socket = net.connect(port, host);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    socket.setNoDelay(true);
    const reader = new Reader(socket);
    const hello = await reader.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) {
      throw new Error(`${host}:${port} is not an NBD server (bad handshake magic).`);
    }
    const serverFlags = hello.readUInt16BE(16);
    if (!(serverFlags & FLAG_FIXED_NEWSTYLE))
      throw new Error('The NBD server does not speak fixed newstyle.');
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
    const name = Buffer.from(exportName);
    const option = Buffer.alloc(16 + 4 + name.length + 2);
    option.writeBigUInt64BE(IHAVEOPT, 0);
    option.writeUInt32BE(OPT_GO, 8);
    option.writeUInt32BE(4 + name.length + 2, 12);
    option.writeUInt32BE(name.length, 16);
    name.copy(option, 20);
    option.writeUInt16BE(0, 20 + name.length); // no information requests
    socket.write(Buffer.concat([clientFlags, option]));
    let size = -1;
    for (;;) {
      const head = await reader.read(20);
      if (head.readBigUInt64BE(0) !== REPLY_MAGIC) throw new Error('Bad NBD option reply magic.');
      const type = head.readUInt32BE(12);
      const length = head.readUInt32BE(16);
      const data = length > 0 ? await reader.read(length) : Buffer.alloc(0);
      if (type === REP_ACK) break;
      if (type === REP_INFO && data.readUInt16BE(0) === INFO_EXPORT) size = Number(data.readBigUInt64BE(2));
      else if (type & 0x80000000) {
        throw new Error(
          `The NBD server refused export "${exportName}": ${data.toString() || `error ${type & 0x7fffffff}`}`,
        );
      }
    }
    if (size < 0) throw new Error('The NBD server did not say the export size.');
    return new NbdClient(socket, reader, size);
  }

  private async request(type: number, offset: number, length: number, payload?: Buffer): Promise<Buffer> {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(0, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(++this.handle, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([header, payload]) : header);
    if (type === CMD.disc) return Buffer.alloc(0);
    const reply = await this.reader.read(16);
    if (reply.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error('Bad NBD reply magic.');
    const error = reply.readUInt32BE(4);
    if (error !== 0)
      throw new Error(`NBD request ${type} at ${offset}+${length} failed with error ${error}.`);
    return type === CMD.read ? this.reader.read(length) : Buffer.alloc(0);
  }

  write(offset: number, data: Buffer): Promise<Buffer> {
    return this.request(CMD.write, offset, data.length, data);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(CMD.read, offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<Buffer> {
    return this.request(CMD.writeZeroes, offset, length);
  }

  flush(): Promise<Buffer> {
    return this.request(CMD.flush, 0, 0);
  }

  async close(): Promise<void> {
    await this.request(CMD.disc, 0, 0);
    this.socket.end();
  }
}

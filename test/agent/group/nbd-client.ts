import net from 'node:net';
import {
  NBD_CMD_DISC,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_INFO_EXPORT,
  NBD_OPT_GO,
  NBD_OPTS_MAGIC,
  NBD_REP_ACK,
  NBD_REP_INFO,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
} from '../../../agent/mobility/nbd/protocol';

/*
 * A small pipelined NBD client for the group tests and bench/groups.ts: many requests in
 * flight on one connection, each resolved when its reply arrives (that moment is the write's
 * acknowledgement, which the causality oracle and the latency figures are about).
 */
export class GroupNbdClient {
  private buffered: Buffer = Buffer.alloc(0);
  private handle = 0n;
  private readonly waiting = new Map<
    bigint,
    { length: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }
  >();
  private handshake: { need: number; resolve: (b: Buffer) => void } | undefined;
  private failure: Error | undefined;
  private closed = false;
  private negotiating = true;

  private constructor(private readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (c: Buffer) => {
      this.buffered = this.buffered.length ? Buffer.concat([this.buffered, c]) : c;
      this.pump();
    });
    const fail = (err: Error): void => {
      this.failure ??= err;
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('NBD connection closed')));
  }

  static async connect(port: number, name: string, host = '127.0.0.1'): Promise<GroupNbdClient> {
    const socket = net.connect(port, host);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const c = new GroupNbdClient(socket);
    await c.read(18);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    const n = Buffer.from(name);
    const opt = Buffer.alloc(20 + n.length + 2);
    opt.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
    opt.writeUInt32BE(NBD_OPT_GO, 8);
    opt.writeUInt32BE(4 + n.length + 2, 12);
    opt.writeUInt32BE(n.length, 16);
    n.copy(opt, 20);
    socket.write(Buffer.concat([flags, opt]));
    for (;;) {
      const head = await c.read(20);
      if (head.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw new Error('bad option reply');
      const type = head.readUInt32BE(12);
      const len = head.readUInt32BE(16);
      const data = len ? await c.read(len) : Buffer.alloc(0);
      if (type === NBD_REP_ACK) break;
      if (type === NBD_REP_INFO && data.readUInt16BE(0) === NBD_INFO_EXPORT) continue;
      if (type & 0x80000000) throw new Error(`export ${name} refused: ${data.toString()}`);
    }
    c.negotiating = false;
    c.pump();
    return c;
  }

  private read(need: number): Promise<Buffer> {
    return new Promise((resolve) => {
      this.handshake = { need, resolve };
      this.pump();
    });
  }

  private pump(): void {
    while (!this.closed) {
      if (this.handshake) {
        const h = this.handshake;
        if (this.buffered.length < h.need) return;
        const out = Buffer.from(this.buffered.subarray(0, h.need));
        this.buffered = this.buffered.subarray(h.need);
        this.handshake = undefined;
        h.resolve(out);
        continue;
      }
      if (this.negotiating) return;
      if (this.buffered.length < 16) return;
      if (this.buffered.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC)
        throw new Error(
          `bad reply magic: ${this.buffered.subarray(0, 32).toString('hex')} (${this.buffered.length} bytes)`,
        );
      const handle = this.buffered.readBigUInt64BE(8);
      const w = this.waiting.get(handle);
      if (!w) throw new Error(`reply for unknown handle ${handle}`);
      if (this.buffered.length < 16 + w.length) return;
      const error = this.buffered.readUInt32BE(4);
      const data = Buffer.from(this.buffered.subarray(16, 16 + w.length));
      this.buffered = this.buffered.subarray(16 + w.length);
      this.waiting.delete(handle);
      if (error) w.reject(new Error(`NBD error ${error}`));
      else w.resolve(data);
    }
  }

  private request(type: number, offset: number, length: number, payload?: Buffer): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    const h = ++this.handle;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(h, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    const p = new Promise<Buffer>((resolve, reject) =>
      this.waiting.set(h, { length: type === NBD_CMD_READ ? length : 0, resolve, reject }),
    );
    this.socket.write(payload ? Buffer.concat([header, payload]) : header);
    return p;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.request(NBD_CMD_WRITE, offset, data.length, data);
  }

  readAt(offset: number, length: number): Promise<Buffer> {
    return this.request(NBD_CMD_READ, offset, length);
  }

  /** Disconnects; resolves once the server closed the connection. */
  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    const gone = new Promise<void>((r) => this.socket.once('close', () => r()));
    this.closed = true;
    const header = Buffer.alloc(28);
    header.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    header.writeUInt16BE(NBD_CMD_DISC, 6);
    this.socket.end(header);
    return gone;
  }
}
